"""Hostile input and misuse (issue 13): each a clear error, never a traceback, crash, hang
or silent wrong output; and prompt caches that stay right whatever the caller does."""

import os
import shutil
import signal
import stat
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from gemma_mtp_mlx import load, make_prompt_cache, stream_generate
from gemma_mtp_mlx.cache_lease import CacheInUse
from gemma_mtp_mlx.checkpoint import CheckpointError
from gemma_mtp_mlx.convert import convert_pair
from gemma_mtp_mlx.validate import MAX_NUM_DRAFT_TOKENS, ContextLengthExceeded, InvalidInput


def cli(*args, stdin=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "gemma_mtp_mlx", *map(str, args)], input=stdin,
                          capture_output=True, timeout=timeout)


def assert_one_line_error(run, message):
    stderr = run.stderr.decode("utf-8", "replace")
    assert run.returncode == 1, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().count("\n") == 0 and message in stderr, stderr


def tokens(*args, **kwargs):
    return [r.token for r in stream_generate(*args, **kwargs)]


# 1. weight files of the target -------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_unreadable_target_weights_are_one_clear_error_naming_the_file(pairs, tmp_path, damage):
    target_path, _ = pairs["e2b"]
    bad = tmp_path / "target"
    shutil.copytree(target_path, bad)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "empty": b"",
                         "garbage": os.urandom(5000)}[damage])
    with pytest.raises(CheckpointError, match=f"{weights}.*could not be read.*download or convert it again"):
        load(bad)


# 2. binary and invalid UTF-8 text ---------------------------------------------------------


def test_undecodable_text_and_bytes_prompts_are_clear_errors(mlx_pairs):
    target, tokenizer, drafter = mlx_pairs["e2b"]
    surrogate_escaped = b"hello \xff\xfe world".decode("utf-8", "surrogateescape")
    with pytest.raises(InvalidInput, match="not valid text: character 6 is an undecodable byte"):
        list(stream_generate(target, tokenizer, surrogate_escaped, draft_model=drafter))
    with pytest.raises(InvalidInput, match="the prompt is bytes: decode it"):
        list(stream_generate(target, tokenizer, b"hello", draft_model=drafter))


def test_cli_binary_stdin_and_undecodable_argument_are_one_line_errors(pairs):
    target, drafter = pairs["e2b"]
    model = ["--model", target, "--draft-model", drafter, "--max-tokens", 4]
    binary = cli("generate", *model, "--prompt", "-", stdin=b"\x00\x9f\x92\x96 binary \xff" * 50)
    assert_one_line_error(binary, "the prompt is not UTF-8 text (byte 1 is b'\\x9f')")
    undecodable = cli("generate", *model, "--prompt", b"caf\xe9".decode("utf-8", "surrogateescape"))
    assert_one_line_error(undecodable, "not valid text: character 3 is an undecodable byte")


# 3. sampling values that are not finite ------------------------------------------------------


@pytest.mark.parametrize("option, value", [
    ("temp", float("nan")), ("temp", float("inf")), ("top_p", float("nan")), ("min_p", float("inf")),
    ("temp", "0.7"), ("top_k", 2.5), ("min_tokens_to_keep", float("nan")),
])
def test_non_finite_or_mistyped_sampling_values_are_refused(mlx_pairs, option, value):
    target, tokenizer, drafter = mlx_pairs["e2b"]
    with pytest.raises(InvalidInput, match=option):
        list(stream_generate(target, tokenizer, [5, 6], draft_model=drafter, max_tokens=4, **{option: value}))


@pytest.mark.parametrize("extra, message", [
    (["--temp", "nan"], "temp must be a finite number, got nan"),
    (["--repetition-penalty", "nan"], "repetition_penalty must be a finite number, got nan"),
])
def test_cli_non_finite_sampling_values_are_one_line_errors(pairs, extra, message):
    target, drafter = pairs["e2b"]
    run = cli("generate", "--model", target, "--draft-model", drafter, "--prompt", "hi", "--max-tokens", 4, *extra)
    assert_one_line_error(run, message)


# 4. token ids and prompt types ---------------------------------------------------------------


@pytest.mark.parametrize("prompt, message", [
    ([5, 256], "token id 256 at index 1 is outside the vocabulary \\(0 to 255\\)"),
    ([-1, 5], "token id -1 at index 0 is outside the vocabulary"),
    ([5, 10**12], "token id 1000000000000 at index 1 is outside the vocabulary"),
    ([5, 1.5], "token ids must be whole numbers, got 1.5 at index 1"),
    ([5, None], "token ids must be whole numbers, got None"),
    ([True, 5], "token ids must be whole numbers, got True"),
    (None, "the prompt must be text \\(str\\) or a list of token ids, got NoneType"),
    (3.5, "got float"),
    (mx.array([1.0, 2.0]), "token ids must be integers, got an array of mlx.core.float32"),
    (np.array([[1, 2], [3, 4]]), "one sequence, got an array of shape \\(2, 2\\)"),
    (mx.array([5, 256]), "token id 256 at index 1 is outside the vocabulary"),
])
def test_token_ids_outside_the_vocabulary_and_wrong_prompt_types_are_refused(mlx_pairs, prompt, message):
    target, tokenizer, drafter = mlx_pairs["e2b"]
    assert target.vocab_size == 256
    with pytest.raises(InvalidInput, match=message):
        list(stream_generate(target, tokenizer, prompt, draft_model=drafter, max_tokens=4))


def test_integer_arrays_and_tuples_are_accepted_prompts(mlx_pairs):
    target, tokenizer, drafter = mlx_pairs["e2b"]
    expected = tokens(target, tokenizer, [5, 6, 7], max_tokens=4)
    for prompt in ((5, 6, 7), np.array([5, 6, 7], dtype=np.uint16), mx.array([[5, 6, 7]])):
        assert tokens(target, tokenizer, prompt, draft_model=drafter, max_tokens=4) == expected


# 5. the context length ----------------------------------------------------------------------


@pytest.fixture
def short_context(mlx_pairs):
    """The e2b pair with a 40-token context (restored afterwards)."""
    pair = mlx_pairs["e2b"]
    saved = pair.target.args.max_position_embeddings
    pair.target.args.max_position_embeddings = 40
    yield pair
    pair.target.args.max_position_embeddings = saved


def test_generation_stops_with_length_at_the_context_limit(short_context):
    target, tokenizer, drafter = short_context
    prompt = list(range(10, 40))  # 30 tokens: room for 10
    for draft in (None, drafter):
        responses = list(stream_generate(target, tokenizer, prompt, draft_model=draft, max_tokens=500))
        assert len(responses) == 10 and responses[-1].finish_reason == "length"
        target.args.max_position_embeddings = 4096
        assert [r.token for r in responses] == tokens(target, tokenizer, prompt, max_tokens=10)
        target.args.max_position_embeddings = 40


def test_a_prompt_that_fills_the_context_is_refused_saying_why(short_context):
    target, tokenizer, drafter = short_context
    with pytest.raises(ContextLengthExceeded, match="the prompt has 40 tokens, which leaves no room in the "
                                                    "model's context of 40 tokens: shorten the prompt"):
        list(stream_generate(target, tokenizer, list(range(10, 50)), draft_model=drafter))
    cache = make_prompt_cache(target)
    list(stream_generate(target, tokenizer, list(range(10, 30)), draft_model=drafter, max_tokens=5,
                         prompt_cache=cache))
    with pytest.raises(ContextLengthExceeded, match="plus 24 already in the prompt cache.*new prompt cache"):
        list(stream_generate(target, tokenizer, list(range(10, 26)), draft_model=drafter, prompt_cache=cache))


# 6. a generator kept after breaking out --------------------------------------------------------


@pytest.mark.parametrize("use_drafter", [True, False])
def test_a_cache_left_by_a_paused_generator_is_settled_before_its_next_use(mlx_pairs, use_drafter):
    target, tokenizer, drafter = mlx_pairs["e2b"]
    drafter = drafter if use_drafter else None
    first, second = list(range(20, 33)), list(range(60, 70))
    cache = make_prompt_cache(target)
    kept = stream_generate(target, tokenizer, first, draft_model=drafter, num_draft_tokens=4 if drafter else None,
                           max_tokens=50, prompt_cache=cache)
    out = [next(kept).token for _ in range(4)]  # the caller breaks out but keeps `kept`
    again = tokens(target, tokenizer, [out[-1]] + second, draft_model=drafter, max_tokens=12, prompt_cache=cache)
    assert cache[0].offset == len(first) + len(out) + len(second) + len(again) - 1
    assert again == tokens(target, tokenizer, first + out + second, max_tokens=12)
    with pytest.raises(CacheInUse, match="taken by a later call while it was paused"):
        next(kept)


# 7. seeded sampling beside other generations ----------------------------------------------------


def test_seeded_sampling_gives_the_same_tokens_when_generations_interleave(mlx_pairs):
    target, tokenizer, drafter = mlx_pairs["e2b"]

    def run(seed):
        return stream_generate(target, tokenizer, [5, 6, 7], draft_model=drafter, max_tokens=20, temp=1.0, seed=seed)

    alone = {seed: [r.token for r in run(seed)] for seed in (1, 2)}
    assert alone[1] != alone[2]
    interleaved = list(zip(run(1), run(2), run(None)))
    assert [a.token for a, _, _ in interleaved] == alone[1]
    assert [b.token for _, b, _ in interleaved] == alone[2]


# 8. two generators on one cache -----------------------------------------------------------------


def test_two_generators_interleaved_on_one_cache_fail_loudly(mlx_pairs):
    target, tokenizer, drafter = mlx_pairs["e2b"]
    cache = make_prompt_cache(target)
    first = stream_generate(target, tokenizer, [5, 6, 7], draft_model=drafter, max_tokens=20, prompt_cache=cache)
    second = stream_generate(target, tokenizer, [8, 9, 10], draft_model=drafter, max_tokens=20, prompt_cache=cache)
    with pytest.raises(CacheInUse, match="taken by a later call"):
        for _ in zip(first, second):
            pass


def test_a_cache_in_use_by_a_running_generation_refuses_a_second_one(mlx_pairs):
    target, tokenizer, drafter = mlx_pairs["e2b"]
    cache = make_prompt_cache(target)
    refused = []

    def intruder(history, logits):  # runs while the first generation is computing
        if not refused:
            try:
                next(stream_generate(target, tokenizer, [8, 9], draft_model=drafter, prompt_cache=cache))
            except CacheInUse as e:
                refused.append(str(e))
        return logits

    out = tokens(target, tokenizer, [5, 6, 7], draft_model=drafter, max_tokens=8, prompt_cache=cache,
                 logits_processors=[intruder])
    assert refused and "in use by a generation that is running now" in refused[0]
    assert out == tokens(target, tokenizer, [5, 6, 7], max_tokens=8)
    assert cache[0].offset == 3 + len(out) - 1


# 9. draft length --------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [MAX_NUM_DRAFT_TOKENS + 1, 1000])
def test_draft_length_has_an_upper_bound_that_says_why(mlx_pairs, k):
    target, tokenizer, drafter = mlx_pairs["e2b"]
    with pytest.raises(InvalidInput, match=f"num_draft_tokens must be between 1 and 16 \\(drafters are trained "
                                           f"for 4-6.*\\), got {k}"):
        list(stream_generate(target, tokenizer, [5, 6], draft_model=drafter, num_draft_tokens=k, max_tokens=4))
    assert len(tokens(target, tokenizer, [5, 6], draft_model=drafter, num_draft_tokens=16, max_tokens=3)) == 3


# 10. converted pair directories ----------------------------------------------------------------


def test_a_converted_pair_directory_follows_the_umask(pairs, tmp_path):
    target, drafter = pairs["e2b"]
    previous = os.umask(0o027)
    try:
        convert_pair(target, drafter, tmp_path / "pair", dtype="float32")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "pair").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "pair" / "drafter").stat().st_mode) == 0o750


# 11. missing tokenizer files ---------------------------------------------------------------------


def test_missing_tokenizer_files_are_named_as_missing(pairs, tmp_path):
    target_path, _ = pairs["e2b"]
    bare = tmp_path / "target"
    shutil.copytree(target_path, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(CheckpointError, match="has no tokenizer files \\(tokenizer.json or tokenizer.model\\): "
                                              "copy them from the original checkpoint"):
        load(bare)


# 12. Ctrl-C during start-up ----------------------------------------------------------------------


def test_ctrl_c_during_start_up_imports_prints_no_traceback():
    """SIGINT once the first heavy module (mlx) is imported, while the rest still load."""
    child = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "gemma_mtp_mlx", "generate", "--help"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in child.stderr:
        lines.append(line)
        if line.split("|")[-1].strip() == "mlx.core":
            child.send_signal(signal.SIGINT)
            break
    _, rest = child.communicate(timeout=120)
    stderr = "".join(lines) + rest
    assert any(line.split("|")[-1].strip() == "mlx.core" for line in lines), "never saw mlx.core imported"
    assert child.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr


# Property: random bytes, ids and option values, through the API and the CLI ---------------------

ODD = [float("nan"), float("inf"), -float("inf"), -1, 0, 2.5, 1e308, 2**70, "1", None, True, b"x", [1]]
GOOD = dict(temp=[0.0, 0.0, 0.7], top_p=[0.5, 1.0], top_k=[0, 5], min_p=[0.0, 0.1], min_tokens_to_keep=[1, 2],
            max_tokens=[1, 3, 6], num_draft_tokens=[None, 1, 3, MAX_NUM_DRAFT_TOKENS], seed=[None, 0, 2**64 - 1],
            draft_mode=["sampled", "greedy"], prefill_step_size=[1, 3, 512])


def random_prompt(rng, vocab):
    size = int(rng.integers(0, 24))
    kind = int(rng.choice(6, p=[0.15, 0.1, 0.2, 0.1, 0.15, 0.3]))
    raw = bytes(rng.integers(0, 256, size=size, dtype=np.uint8))
    if kind == 0:
        return raw.decode("utf-8", "surrogateescape")  # how bytes that are not UTF-8 reach Python
    if kind == 1:
        return raw if rng.random() < 0.5 else raw.decode("latin-1")
    if kind == 2:
        return rng.integers(-3, vocab + 3, size=size).tolist()
    if kind == 3:
        return [ODD[int(i)] if rng.random() < 0.2 else int(i) for i in rng.integers(0, len(ODD), size=size)]
    if kind == 4:
        dtype = [mx.int32, mx.uint32, mx.int64, mx.float32, mx.bool_][int(rng.integers(5))]
        return mx.array(rng.integers(0, vocab + 2, size=size)).astype(dtype)
    return rng.integers(3, vocab, size=size + 1).tolist()


def random_options(rng):
    options = {}
    for name, good in GOOD.items():
        if rng.random() < 0.6:
            pool = good if rng.random() < 0.9 else ODD + ["other"]
            options[name] = pool[int(rng.integers(len(pool)))]
    return options


def test_random_prompts_and_options_give_a_clear_error_or_correct_output(short_context):
    """60 random cases; the 40-token context bounds the valid huge `max_tokens` values."""
    target, tokenizer, drafter = short_context
    rng = np.random.default_rng(13)
    outcomes = {"error": 0, "output": 0}
    for case in range(60):
        prompt, options = random_prompt(rng, target.vocab_size), random_options(rng)
        draft = drafter if rng.random() < 0.7 else None
        described = f"case {case}: prompt={prompt!r} options={options} drafter={draft is not None}"
        try:
            out = list(stream_generate(target, tokenizer, prompt, draft_model=draft, **options))
        except InvalidInput as e:
            assert str(e) and "\n" not in str(e), described
            outcomes["error"] += 1
            continue
        outcomes["output"] += 1
        assert 1 <= len(out) <= options.get("max_tokens", 256), described
        assert all(0 <= r.token < target.vocab_size for r in out), described
        assert out[-1].finish_reason in ("stop", "length"), described
        if options.get("temp", 0.0) == 0.0:  # greedy: exactly plain decoding
            plain = tokens(target, tokenizer, prompt, max_tokens=len(out), prefill_step_size=512)
            assert [r.token for r in out] == plain, described
    assert min(outcomes.values()) >= 10, outcomes  # both kinds were exercised


CLI_VALUES = ["nan", "inf", "-inf", "-1", "0", "1", "3", "0.5", "1e999", "1000", "", "abc", "2.5",
              b"\xff\xfe".decode("utf-8", "surrogateescape")]
NOT_FINITE = ("nan", "inf", "-inf", "1e999")
CLI_OPTIONS = ["--max-tokens", "--num-draft-tokens", "--temp", "--top-p", "--top-k", "--min-p",
               "--repetition-penalty", "--seed", "--draft-mode", "--system", "--prompt"]


def test_random_cli_arguments_and_stdin_bytes_never_give_a_traceback(pairs, monkeypatch, capsys):
    import io

    from gemma_mtp_mlx import cli

    target, drafter = pairs["e2b"]
    rng = np.random.default_rng(13)
    codes = set()
    surely_bad = [["--temp=nan", "--prompt=hi"], ["--repetition-penalty=inf", "--prompt=hi"], [f"--prompt={CLI_VALUES[-1]}"], [f"--system={CLI_VALUES[-1]}"]]
    for case in range(30):
        argv = ["generate", "--model", str(target), "--draft-model", str(drafter), "--max-tokens", "3"]
        if case < len(surely_bad):
            argv += surely_bad[case]
        for _ in range(0 if case < len(surely_bad) else int(rng.integers(1, 4))):
            argv += [f"{CLI_OPTIONS[int(rng.integers(len(CLI_OPTIONS)))]}={CLI_VALUES[int(rng.integers(len(CLI_VALUES)))]}"]
        if not any(a.startswith("--prompt=") for a in argv):
            argv.append("--prompt=-")
        stdin = bytes(rng.integers(0, 256, size=int(rng.integers(0, 40)), dtype=np.uint8))
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse: usage and one error line
            code = e.code
        err = capsys.readouterr().err
        described = f"case {case}: argv={argv[6:]} stdin={stdin!r}: {err}"
        assert code in (0, 1, 2), described
        assert "Traceback" not in err, described
        if code == 1:
            assert err.startswith("gemma-mtp: error: ") and err.strip().count("\n") == 0, described
        if code == 0:  # then every value was usable: finite numbers, decodable text
            numbers = [a.partition("=")[2] for a in argv if a.partition("=")[0] in CLI_OPTIONS[:8]]
            assert not any(v in NOT_FINITE for v in numbers) and not any("\udcff" in a for a in argv), described
            assert "--prompt=-" not in argv or stdin.decode("utf-8", "replace") == stdin.decode("utf-8", "ignore")
        codes.add(code)
    assert codes >= {0, 1, 2}, codes
