"""The command line: generate (text, json, stdin), chat through a pseudo-terminal, errors."""

import io
import json
import subprocess
import sys

import pexpect
import pytest

from gemma_mtp_mlx import stream_generate
from gemma_mtp_mlx.chat import Conversation
from gemma_mtp_mlx.generate import chat_prompt


def cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "gemma_mtp_mlx", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=300)


def pair_args(pairs, name="e2b"):
    target, drafter = pairs[name]
    return ["--model", target, "--draft-model", drafter]


def test_generate_streams_text_and_prints_stats(pairs):
    run = cli("generate", *pair_args(pairs), "--prompt", "hello world", "--max-tokens", 12)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()
    for label in ("prompt:", "generation: ", "mean accepted length", "acceptance by position", "peak memory"):
        assert label in run.stderr


def test_generate_json_matches_the_python_api(pairs, mlx_pairs):
    run = cli("generate", *pair_args(pairs), "--prompt", "hello world", "--max-tokens", 20, "--output", "json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    target, tokenizer, drafter = mlx_pairs["e2b"]
    prompt = chat_prompt(tokenizer, "hello world")
    api = list(stream_generate(target, tokenizer, prompt, draft_model=drafter, max_tokens=20))
    assert result["tokens"] == [r.token for r in api]
    assert result["text"] == "".join(r.text for r in api)
    stats = result["stats"]
    assert stats["generation_tokens"] == len(result["tokens"])
    assert stats["rounds"] == api[-1].stats.rounds
    assert result["finish_reason"] in ("stop", "length")


def test_generate_reads_the_prompt_from_stdin(pairs):
    from_stdin = cli("generate", *pair_args(pairs), "--prompt", "-", "--max-tokens", 8, "--output", "json",
                     stdin="hello world")
    from_flag = cli("generate", *pair_args(pairs), "--prompt", "hello world", "--max-tokens", 8, "--output", "json")
    assert json.loads(from_stdin.stdout)["tokens"] == json.loads(from_flag.stdout)["tokens"]


def test_help_lists_every_option_with_defaults():
    run = cli("generate", "--help")
    for option in ("--model", "--draft-model", "--prompt", "--max-tokens", "--num-draft-tokens", "--temp",
                   "--top-p", "--top-k", "--min-p", "--repetition-penalty", "--seed", "--system",
                   "--no-chat-template", "--output", "--verbose", "--no-draft", "--stats-json"):
        assert option in run.stdout
    assert "default: 256" in run.stdout


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-tokens", "0"], "max_tokens must be at least 1"),
        (["--num-draft-tokens", "0"], "num_draft_tokens must be at least 1"),
        (["--temp", "-1"], "temp must be >= 0"),
        (["--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--top-k", "-2"], "top_k must be >= 0"),
        (["--regex", "("], "response_format.regex does not compile"),
        (["--json-schema", '{"type":'], "--json-schema is not valid JSON"),
        (["--grammar", "/no/such/file.lark"], "--grammar: cannot read"),
    ],
)
def test_bad_option_values_exit_nonzero_with_one_line(pairs, extra, message):
    run = cli("generate", *pair_args(pairs), "--prompt", "hi", *extra)
    assert run.returncode != 0
    assert run.stderr.strip().count("\n") == 0 and message in run.stderr
    assert "Traceback" not in run.stderr


def test_generate_with_a_json_schema_prints_json_valid_under_it(pairs, tmp_path):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    for source in (str(path), json.dumps(schema)):  # a file, or inline JSON
        run = cli("generate", *pair_args(pairs), "--prompt", "hi", "--max-tokens", 20, "--output", "json",
                  "--json-schema", source)
        assert run.returncode == 0, run.stderr
        out = json.loads(run.stdout)
        assert out["finish_reason"] == "stop" and json.loads(out["text"]) in ({"ok": True}, {"ok": False})


def test_missing_model_and_mismatched_pair_exit_nonzero_with_one_line(pairs, narrow_assistant, tmp_path):
    missing = cli("generate", "--model", tmp_path / "nope", "--prompt", "hi")
    e2b_target, _ = pairs["e2b"]
    mismatched = cli("generate", "--model", e2b_target, "--draft-model", narrow_assistant, "--prompt", "hi")
    for run, message in ((missing, "does not exist"), (mismatched, "drafter expects")):
        assert run.returncode != 0
        assert run.stderr.strip().count("\n") == 0 and message in run.stderr
        assert "Traceback" not in run.stderr


def start_chat(pairs, *extra):
    child = pexpect.spawn(sys.executable, ["-m", "gemma_mtp_mlx", "chat", *map(str, [*pair_args(pairs), *extra])],
                          encoding="utf-8", timeout=120)
    child.expect(">> ")
    return child


def ask(child, text):
    child.sendline(text)
    child.expect(">> ")
    return child.before


def prompt_token_count(child):
    child.sendline("/stats")
    child.expect(r"prompt: (\d+) tokens")
    count = int(child.match.group(1))
    child.expect(">> ")
    return count


def test_chat_second_turn_prefills_only_new_tokens_and_reset_clears(pairs, mlx_pairs):
    _, tokenizer, _ = mlx_pairs["e2b"]
    child = start_chat(pairs, "--max-tokens", 10)
    ask(child, "hello there")
    first = prompt_token_count(child)
    assert first == len(tokenizer.apply_chat_template([{"role": "user", "content": "hello there"}],
                                                      add_generation_prompt=True))
    ask(child, "how are you")
    second = prompt_token_count(child)
    turn = tokenizer.encode("<end_of_turn>\n<start_of_turn>user\nhow are you<end_of_turn>\n<start_of_turn>model\n",
                            add_special_tokens=False)
    assert second in (len(turn), len(turn) + 1)  # + the reply's last token unless it was EOS
    assert "[conversation cleared]" in ask(child, "/reset")
    ask(child, "hello there")
    assert prompt_token_count(child) == first
    child.sendeof()
    child.expect(pexpect.EOF)


def test_chat_ctrl_c_drops_the_line_at_the_prompt_and_stops_a_reply(pairs):
    child = start_chat(pairs, "--max-tokens", 100000, "--max-context", 200000)
    # At the prompt (">> " is printed once the chat waits for a line): the typed line is
    # dropped and no reply starts.
    child.send("a line never sent")
    child.sendintr()
    child.expect(">> ")
    assert "[interrupted]" not in child.before
    assert "[no reply yet]" in ask(child, "/stats")
    # During a reply: the reply stops where it is.
    child.sendline("tell me everything")
    child.expect("tell me everything\r\n")  # the terminal's echo
    child.expect(r"\S[\s\S]{40}")  # the reply is streaming
    child.sendintr()
    child.expect(r"\[interrupted\]")
    child.expect(">> ")
    assert "/reset" in ask(child, "/help")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_system_message_reaches_the_prompt(pairs, mlx_pairs):
    target, tokenizer, drafter = mlx_pairs["e2b"]
    system = "answer in one line"
    prompt = chat_prompt(tokenizer, "hello", system)
    assert len(prompt) > len(chat_prompt(tokenizer, "hello"))  # the template renders it
    run = cli("generate", *pair_args(pairs), "--prompt", "hello", "--system", system, "--max-tokens", 8,
              "--output", "json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["stats"]["prompt_tokens"] == len(prompt)
    assert result["tokens"] == [r.token for r in stream_generate(target, tokenizer, prompt, draft_model=drafter,
                                                                  max_tokens=8)]
    conversation = Conversation(target, tokenizer, drafter, dict(max_tokens=4), system=system)
    conversation.reply("hello", io.StringIO())
    assert conversation.stats.prompt_tokens == len(prompt)


def test_chat_context_limit_is_a_message_not_a_crash(pairs):
    child = start_chat(pairs, "--max-tokens", 50, "--max-context", 60)
    out = ask(child, "a long enough question to pass the limit")
    assert "context limit of 60 tokens" in out
    child.sendline("/exit")
    child.expect(pexpect.EOF)


def test_convert_then_generate_from_the_pair_directory(pairs, tmp_path):
    out = tmp_path / "pair"
    target, drafter = pairs["e2b"]
    run = cli("convert", "--model", target, "--draft-model", drafter, "-o", out, "-q", "--q-bits", 8,
              "--q-group-size", 32)
    assert run.returncode == 0, run.stderr
    assert "converted size" in run.stdout and "peak conversion memory" in run.stdout
    speculative = cli("generate", "--model", out, "--prompt", "hi", "--max-tokens", 12, "--output", "json")
    plain = cli("generate", "--model", out, "--no-draft", "--prompt", "hi", "--max-tokens", 12, "--output", "json")
    assert json.loads(speculative.stdout)["stats"]["num_draft_tokens"] == 6  # the pair's drafter
    assert json.loads(plain.stdout)["stats"]["num_draft_tokens"] == 0
    assert json.loads(speculative.stdout)["tokens"] == json.loads(plain.stdout)["tokens"]
    again = cli("convert", "--model", target, "--draft-model", drafter, "-o", out)
    assert again.returncode != 0 and "--overwrite" in again.stderr and "Traceback" not in again.stderr


def test_verbose_view_and_stats_json_show_the_rounds(pairs, tmp_path):
    stats_file = tmp_path / "stats.json"
    run = cli("generate", *pair_args(pairs), "--prompt", "hello", "--max-tokens", 10, "--num-draft-tokens", 3,
              "--verbose", "--stats-json", stats_file)
    assert run.returncode == 0, run.stderr
    stats = json.loads(stats_file.read_text())
    log = stats["rounds_log"]
    assert sum(len(r["emitted"]) for r in log) == stats["generation_tokens"] == 10
    round_lines = [line for line in run.stderr.splitlines() if line.startswith("@")]
    assert len(round_lines) == len(log)
    assert "prefill" in round_lines[0] and "->" in round_lines[0]
    assert all(f"/{len(r['drafted'])}" in line for r, line in zip(log[1:], round_lines[1:]))
    assert "rejection rate" in run.stderr and "fallback rate" in run.stderr


def test_a_slow_first_use_is_reported_and_left_out_of_the_speeds(pairs, monkeypatch, capsys):
    """`generate` warms MLX's kernels up on a short prompt first (on a fresh machine their
    compilation took 20 s and the stats read "0.3 tokens/s"); when that was slow it says
    so. Here every warm-up counts as slow."""
    from gemma_mtp_mlx import cli as cli_module

    monkeypatch.setattr(cli_module, "WARM_UP_NOTICE_SECONDS", -1.0)
    assert cli_module.main(["generate", *map(str, pair_args(pairs)), "--prompt", "hi", "--max-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert "first use on this machine: MLX prepared its kernels" in err
    assert err.index("first use") < err.index("prompt:")
