"""`gemma-mtp serve` against live server processes on 127.0.0.1, with the official
`openai` client: equal to `gemma-mtp generate`, streams equal to whole replies, stop
strings, the target's real log-probabilities, concurrency, the prompt cache, errors."""

import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlx.core as mx
import numpy as np
import openai
import pytest

from mlx_lm.sample_utils import make_logits_processors

from gemma_mtp_mlx import generate, load
from gemma_mtp_mlx.cli import main
from gemma_mtp_mlx.generate import chat_prompt
from gemma_mtp_mlx.loading import DEFAULT_PROMPTS_FILE

STARTUP_SECONDS = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`gemma-mtp serve` in a subprocess on a free port of 127.0.0.1."""

    def __init__(self, *args, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "gemma_mtp_mlx", "serve", "--port", str(self.port),
                                          *map(str, args)], stdout=out, stderr=subprocess.STDOUT)
        self.statuses = []  # /health answers while starting
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited: {log.read_text()}"
            status, body = self.get("/health")
            if status:
                self.statuses.append((status, body))
            if status == 200:
                break
            time.sleep(0.2)
        else:
            self.close()
            raise AssertionError(f"server did not become ready: {log.read_text()}")
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def get(self, path: str):
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return None, None

    def post(self, path: str, body, raw: bool = False):
        data = body if raw else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def metrics(self) -> dict:
        status, text = self.get("/metrics")
        assert status == 200
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The default pair (no --model): a code model with no chat template."""
    s = Server("--max-tokens", 32, log=tmp_path_factory.mktemp("serve") / "default.log")
    yield s
    s.close()


@pytest.fixture(scope="module")
def chat_server(pairs, tmp_path_factory):
    """The E2B-like fixture pair, whose tokenizer has a chat template."""
    target, drafter = pairs["e2b"]
    s = Server("--model", target, "--draft-model", drafter, "--num-draft-tokens", 3,
               log=tmp_path_factory.mktemp("serve") / "chat.log")
    yield s
    s.close()


def cli_generate(*args) -> dict:
    run = subprocess.run([sys.executable, "-m", "gemma_mtp_mlx", "generate", "--output", "json", *map(str, args)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def streamed(stream):
    """(text, chunks) of an openai stream."""
    chunks = list(stream)
    text = "".join(c.choices[0].text if hasattr(c.choices[0], "text") else (c.choices[0].delta.content or "")
                   for c in chunks if c.choices)
    return text, chunks


def held_out_prompts(n: int):
    return [json.loads(line) for line in DEFAULT_PROMPTS_FILE.read_text().splitlines()[:n]]


PROMPT = 'def read_lines(path):\n    """Return the lines of a text file."""\n'


def test_completions_equal_generate_streamed_or_not(server):
    expected = cli_generate("--prompt", PROMPT, "--no-chat-template", "--max-tokens", 24)
    whole = server.client.completions.create(model="any", prompt=PROMPT, max_tokens=24, temperature=0)
    assert whole.choices[0].text == expected["text"]
    assert whole.choices[0].finish_reason == expected["finish_reason"]
    assert whole.usage.completion_tokens == len(expected["tokens"])
    text, chunks = streamed(server.client.completions.create(model="any", prompt=PROMPT, max_tokens=24,
                                                             temperature=0, stream=True))
    assert text == expected["text"]
    assert chunks[-1].choices[0].finish_reason == expected["finish_reason"]


def test_per_request_options_equal_the_api(server):
    model, tokenizer, drafter = load()
    penalty = make_logits_processors(repetition_penalty=1.3)
    expected = generate(model, tokenizer, PROMPT, draft_model=drafter, max_tokens=24, num_draft_tokens=2,
                        logits_processors=penalty)
    extra = dict(repetition_penalty=1.3, num_draft_tokens=2)
    whole = server.client.completions.create(model="any", prompt=PROMPT, max_tokens=24, extra_body=extra)
    assert whole.choices[0].text == expected
    speculative = whole.usage.model_extra["speculative"]
    assert len(speculative["acceptance_by_position"]) == 2 and speculative["mean_accepted_length"] <= 3
    text, _ = streamed(server.client.completions.create(model="any", prompt=PROMPT, max_tokens=24, stream=True,
                                                        extra_body=extra))
    assert text == expected
    plain = generate(model, tokenizer, PROMPT, max_tokens=24)
    auto = server.client.completions.create(model="any", prompt=PROMPT, max_tokens=24,
                                            extra_body=dict(num_draft_tokens="auto"))
    assert auto.choices[0].text == plain
    speculative = auto.usage.model_extra["speculative"]
    assert speculative["num_draft_tokens"] == "auto" and speculative["rounds"] >= 1


def test_chat_completions_equal_generate_streamed_or_not(chat_server, pairs):
    target, drafter = pairs["e2b"]
    expected = cli_generate("--model", target, "--draft-model", drafter, "--prompt", "hello there",
                            "--max-tokens", 16)
    messages = [{"role": "user", "content": "hello there"}]
    whole = chat_server.client.chat.completions.create(model="any", messages=messages, max_tokens=16,
                                                       temperature=0)
    assert whole.choices[0].message.content == expected["text"]
    assert whole.choices[0].message.role == "assistant"
    text, chunks = streamed(chat_server.client.chat.completions.create(
        model="any", messages=messages, max_completion_tokens=16, temperature=0, stream=True))
    assert text == expected["text"]
    assert chunks[0].choices[0].delta.role == "assistant"


def test_usage_chunk_arrives_only_with_include_usage(server):
    text, chunks = streamed(server.client.completions.create(
        model="any", prompt=PROMPT, max_tokens=12, stream=True, stream_options={"include_usage": True}))
    *body, last = chunks
    assert last.choices == [] and all(c.usage is None for c in body)
    usage = last.usage
    assert usage.completion_tokens == 12 and usage.total_tokens == usage.prompt_tokens + 12
    assert usage.prompt_tokens_details.cached_tokens >= 0
    spec = usage.model_extra["speculative"]
    assert spec["mean_accepted_length"] >= 1 and len(spec["acceptance_by_position"]) == spec["num_draft_tokens"]
    _, chunks = streamed(server.client.completions.create(model="any", prompt=PROMPT, max_tokens=12, stream=True))
    assert all(c.usage is None and c.choices for c in chunks)


def test_stop_strings_cut_exactly_streamed_or_not(server):
    full = server.client.completions.create(model="any", prompt=PROMPT, max_tokens=32, logprobs=0)
    text = full.choices[0].text
    token_ends = np.cumsum([len(t) for t in full.choices[0].logprobs.tokens])
    cases = []
    for end in token_ends[2:-2:3]:  # stop strings that span two tokens, or a round's end and the next's start
        stop = text[end - 2 : end + 3]
        cases.append(([stop], text[: text.find(stop)]))
    first, later = text[10:13], text[20:26]
    cases.append(([later, first], text[: text.find(first)]))  # the earliest stop string wins
    for stop, expected in cases:
        whole = server.client.completions.create(model="any", prompt=PROMPT, max_tokens=32, stop=stop)
        assert (whole.choices[0].text, whole.choices[0].finish_reason) == (expected, "stop"), stop
        got, chunks = streamed(server.client.completions.create(model="any", prompt=PROMPT, max_tokens=32,
                                                                stop=stop, stream=True))
        assert got == expected and chunks[-1].choices[0].finish_reason == "stop", stop
    missing = server.client.completions.create(model="any", prompt=PROMPT, max_tokens=32, stop=["\x00never"])
    assert missing.choices[0].text == text and missing.choices[0].finish_reason == "length"


def test_stop_strings_never_leave_the_server_whatever_the_rounds():
    """Job.feed on every split of one reply into rounds: the text before the stop string
    goes out whole, the stop string never, and held-back text is released at the end."""
    from gemma_mtp_mlx.batch import RowEvent
    from gemma_mtp_mlx.server.worker import Job

    _, tokenizer, _ = load()
    text = "    return self.path.read_text().splitlines()\n"
    tokens = tokenizer.encode(text, add_special_tokens=False)
    for stop, expected in [(".read", "    return self.path"), ("()\n", "    return self.path.read_text().splitlines"),
                           ("().sp", "    return self.path.read_text"), ("nowhere", text)]:
        for size in (1, 2, 3, 5):
            job = Job([2], dict(max_tokens=len(tokens)), [stop, "x" * 20], 0, False, tokenizer.detokenizer,
                      lambda t: tokenizer.decode([t]), set(tokenizer.eos_token_ids), 4, loop=None)
            out, finish = "", None
            for start in range(0, len(tokens), size):
                chunk = tokens[start : start + size]
                last = start + size >= len(tokens)
                delta = job.feed(RowEvent(0, chunk, [0.0] * len(chunk), [], [True] * (len(chunk) - 1) + [False],
                                          "length" if last else None))
                if delta is not None:
                    out += delta.text
                    finish = delta.finish_reason
                    assert stop not in out
                if job.done:
                    break
            assert (out, finish) == (expected, "stop" if stop != "nowhere" else "length"), (stop, size)


def test_logprobs_are_the_targets_real_values_also_in_streams(chat_server, pairs):
    target, tokenizer, _ = load(pairs["e2b"][0])
    messages = [{"role": "user", "content": "count with me"}]
    whole = chat_server.client.chat.completions.create(model="any", messages=messages, max_tokens=10,
                                                       logprobs=True, top_logprobs=3)
    _, chunks = streamed(chat_server.client.chat.completions.create(
        model="any", messages=messages, max_tokens=10, logprobs=True, top_logprobs=3, stream=True))
    streamed_entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    entries = whole.choices[0].logprobs.content
    assert [(e.token, e.logprob) for e in streamed_entries] == [(e.token, e.logprob) for e in entries]
    assert len(entries) == whole.usage.completion_tokens == 10
    # The reference: one target forward over the prompt and the reply, log-softmax at each position.
    prompt = chat_prompt(tokenizer, "count with me")
    reply = tokenizer.encode(whole.choices[0].message.content, add_special_tokens=False)
    assert [tokenizer.decode([t]) for t in reply] == [e.token for e in entries]
    logits, _ = target(mx.array([prompt + reply]), target.make_cache(4))
    logprobs = np.array(logits[0, len(prompt) - 1 : -1] - mx.logsumexp(logits[0, len(prompt) - 1 : -1], axis=-1,
                                                                         keepdims=True))
    for i, (entry, token) in enumerate(zip(entries, reply)):
        assert entry.logprob == pytest.approx(logprobs[i, token], abs=1e-3)
        best = np.argsort(-logprobs[i])[:3]
        assert [t.token for t in entry.top_logprobs] == [tokenizer.decode([int(t)]) for t in best]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(logprobs[i, best], abs=1e-3)


def test_seeded_sampling_is_reproducible(server):
    ask = lambda seed: server.client.completions.create(model="any", prompt=PROMPT, max_tokens=16,
                                                        temperature=0.9, seed=seed).choices[0].text
    first = ask(7)
    assert ask(7) == first
    assert any(ask(seed) != first for seed in (8, 9))


def test_multi_turn_chat_prefills_only_the_new_turn(chat_server, pairs):
    system = {"role": "system", "content": "You answer in short sentences about small things."}
    turn1 = [system, {"role": "user", "content": "first question"}]
    one = chat_server.client.chat.completions.create(model="any", messages=turn1, max_tokens=8)
    turn2 = turn1 + [{"role": "assistant", "content": one.choices[0].message.content},
                     {"role": "user", "content": "and a second one"}]
    two = chat_server.client.chat.completions.create(model="any", messages=turn2, max_tokens=8)
    assert two.usage.prompt_tokens_details.cached_tokens >= one.usage.prompt_tokens
    # Another conversation with the same system turn reuses its K/V.
    _, tokenizer, _ = load(pairs["e2b"][0])
    system_tokens = len(tokenizer.apply_chat_template([system], tokenize=True))
    other = chat_server.client.chat.completions.create(
        model="any", messages=[system, {"role": "user", "content": "unrelated"}], max_tokens=8)
    assert other.usage.prompt_tokens_details.cached_tokens >= system_tokens - 2


def request_variants():
    """16 requests with different prompts and options."""
    prompts = held_out_prompts(16)
    variants = []
    for i, prompt in enumerate(prompts):
        options = dict(max_tokens=8 + (i % 4) * 4)
        if i % 4 == 1:
            options["extra_body"] = dict(num_draft_tokens=1 + i % 3)
        if i % 5 == 2:
            options["stop"] = ["\n\n", "):"]
        if i % 6 == 3:
            options["logprobs"] = 2
        if i % 7 == 4:
            options["extra_body"] = dict(repetition_penalty=1.2)
        if i in (5, 11):
            options.update(temperature=0.8, seed=i)
        variants.append((prompt, options))
    return variants


def stream_answer(client, prompt, options):
    text, chunks = streamed(client.completions.create(model="any", prompt=prompt, stream=True,
                                                      stream_options={"include_usage": True}, **options))
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, finishes, chunks[-1].usage.completion_tokens


def kill_mid_stream(server, started: threading.Event):
    """A raw client that reads the first chunks of a long stream and then drops the connection."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(dict(prompt=PROMPT, max_tokens=200, stream=True)),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    response.read(300)
    started.set()
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()


def test_sixteen_concurrent_streams_equal_their_sequential_answers(server):
    variants = request_variants()
    sequential = [stream_answer(server.client, p, o) for p, o in variants]
    before = server.metrics()
    answers = [None] * len(variants)

    def ask(i):
        answers[i] = stream_answer(server.client, *variants[i])

    started = threading.Event()
    killer = threading.Thread(target=kill_mid_stream, args=(server, started))
    killer.start()
    assert started.wait(60)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(variants))]
    for t in threads:
        t.start()
    for t in threads + [killer]:
        t.join(timeout=300)
    for i, (got, want) in enumerate(zip(answers, sequential)):
        assert got == want, (i, variants[i])
        assert len(got[1]) == 1  # exactly one finishing chunk
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = server.metrics()
        if after["gemma_mtp_batch_size"] == 0 and after["gemma_mtp_queue_length"] == 0:
            break
        time.sleep(0.2)
    assert after["gemma_mtp_batch_size"] == 0 and after["gemma_mtp_queue_length"] == 0
    cancelled = 'gemma_mtp_requests_total{finish_reason="cancelled"}'
    assert after.get(cancelled, 0) == before.get(cancelled, 0) + 1  # the killed stream's row was freed
    served = sum(v for k, v in after.items() if k.startswith("gemma_mtp_requests_total"))
    assert served - sum(v for k, v in before.items() if k.startswith("gemma_mtp_requests_total")) == 17
    # Memory: what is in use beyond the prompt cache's entries is back to where it was before
    # the burst (the cache was full then too: its entries' allocations cost more than their
    # bytes at these tiny sizes, so the idle level itself is out of reach while it holds them).
    in_use = [m["gemma_mtp_memory_active_bytes"] - m["gemma_mtp_prompt_cache_bytes"] for m in (before, after)]
    assert before["gemma_mtp_prompt_cache_entries"] == after["gemma_mtp_prompt_cache_entries"]
    assert in_use[1] <= in_use[0] + 1e6


BAD_REQUESTS = [
    ("/v1/completions", dict(prompt="x", max_tokens=-1), 400, "max_tokens"),
    ("/v1/completions", dict(prompt="x", max_tokens=0), 400, "max_tokens"),
    ("/v1/completions", dict(prompt="x", temperature=-0.5), 400, "temperature"),
    ("/v1/completions", dict(prompt="x", top_p=0), 400, "top_p"),
    ("/v1/completions", dict(prompt="x", top_p=1.5), 400, "top_p"),
    ("/v1/completions", dict(prompt="x", top_k=-1), 400, "top_k"),
    ("/v1/completions", dict(prompt="x", min_p=2), 400, "min_p"),
    ("/v1/completions", dict(prompt="x", repetition_penalty=0), 400, "repetition_penalty"),
    ("/v1/completions", dict(prompt="x", num_draft_tokens=0), 400, "num_draft_tokens"),
    ("/v1/completions", dict(prompt="x", num_draft_tokens=99), 400, "num_draft_tokens"),
    ("/v1/completions", dict(prompt="x", num_draft_tokens="fast"), 400, "num_draft_tokens"),
    ("/v1/completions", dict(prompt="x", logprobs=99), 400, "logprobs"),
    ("/v1/completions", dict(prompt="x", n=2), 400, "n"),
    ("/v1/completions", dict(prompt="x", stop=[""]), 400, "stop"),
    ("/v1/completions", dict(prompt=""), 400, "prompt is empty"),
    ("/v1/completions", dict(prompt=[1, 2, 10**9]), 400, "token ids"),
    ("/v1/completions", dict(max_tokens=3), 400, "prompt"),
    ("/v1/completions", dict(prompt=[5] * 8190, max_tokens=10), 400, "context"),
    ("/v1/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "hi"}]), 400, "no chat template"),
    ("/v1/nothing", dict(prompt="x"), 404, "no such path"),
    ("/v1/completions", dict(prompt="x", response_format={"type": "regex", "regex": "("}), 400,
     "response_format.regex does not compile"),
    ("/v1/completions", dict(prompt="x", response_format={"type": "json_schema", "json_schema": {"schema": 3}}),
     400, "response_format.json_schema.schema must be"),
]


@pytest.mark.parametrize("path, body, status, message", BAD_REQUESTS)
def test_bad_requests_answer_json_errors_and_the_server_goes_on(server, path, body, status, message):
    got, answer = server.post(path, body, raw=isinstance(body, bytes))
    assert got == status and message in answer["error"]["message"], answer
    assert answer["error"]["type"]
    good = server.client.completions.create(model="any", prompt="x = ", max_tokens=2)
    assert good.usage.completion_tokens == 2


CHAT_BAD_REQUESTS = [
    (dict(messages=[{"role": "wizard", "content": "hi"}]), "role"),
    (dict(messages=[]), "messages"),
    (dict(messages=[{"role": "user", "content": "hi"}], max_completion_tokens=-3), "max_completion_tokens"),
    (dict(messages=[{"role": "user", "content": "hi"}], top_logprobs=2), "top_logprobs needs logprobs"),
    (dict(messages=[{"role": "user", "content": "x " * 5000}], max_tokens=10), "context"),
]


@pytest.mark.parametrize("body, message", CHAT_BAD_REQUESTS)
def test_bad_chat_requests_answer_400(chat_server, body, message):
    got, answer = chat_server.post("/v1/chat/completions", body)
    assert got == 400 and message in answer["error"]["message"], answer
    good = chat_server.client.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}],
                                                      max_tokens=2)
    assert good.usage.completion_tokens == 2


def test_response_format_json_schema_returns_valid_json_streamed_or_not(server):
    """The reply is the API's constrained output (with the drafter), valid under the schema."""
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                               "size": {"type": "integer", "minimum": 0, "maximum": 999}},
              "required": ["name", "size"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "item", "schema": schema}}
    model, tokenizer, drafter = load()
    expected = generate(model, tokenizer, PROMPT, draft_model=drafter, max_tokens=32, response_format=fmt)
    whole = server.client.completions.create(model="any", prompt=PROMPT, max_tokens=32,
                                             extra_body=dict(response_format=fmt))
    assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "stop"
    assert set(json.loads(expected)) == {"name", "size"}
    text, _ = streamed(server.client.completions.create(model="any", prompt=PROMPT, max_tokens=32, stream=True,
                                                        extra_body=dict(response_format=fmt)))
    assert text == expected


def test_health_models_and_metrics(server):
    assert all(status in (200, 503) for status, _ in server.statuses)
    for status, body in server.statuses:
        if status == 503:
            assert "loading" in json.loads(body)["error"]["message"]
    assert server.client.models.list().data[0].id == "gemma-4-tiny-python"
    text = server.get("/metrics")[1]
    for name in ("requests_total", "completion_tokens_total", "mean_accepted_length", "queue_length", "batch_size"):
        assert re.search(rf"^gemma_mtp_{name}", text, re.M), name


def test_requests_while_loading_answer_503():
    from fastapi.testclient import TestClient

    from gemma_mtp_mlx.server.app import create_app
    from gemma_mtp_mlx.server.worker import Worker

    release = threading.Event()
    worker = Worker(lambda: release.wait(30) and None)
    with TestClient(create_app(worker, "m")) as client:
        for path in ("/health", "/v1/models"):
            response = client.get(path)
            assert response.status_code == 503 and "loading" in response.json()["error"]["message"]
        response = client.post("/v1/completions", json=dict(prompt="x"))
        assert response.status_code == 503
        release.set()


def test_serve_with_a_missing_model_exits_with_one_line(tmp_path, capsys):
    code = main(["serve", "--model", str(tmp_path / "none"), "--port", str(free_port())])
    err = capsys.readouterr().err
    assert code == 1
    assert "gemma-mtp: error: the model failed to load" in err and "Traceback" not in err


def test_a_failing_request_fails_alone_and_the_generation_thread_goes_on():
    import asyncio
    from types import SimpleNamespace

    from gemma_mtp_mlx.server.prompt_cache import PromptCache
    from gemma_mtp_mlx.batch import BatchEngine
    from gemma_mtp_mlx.server.worker import Job, Worker

    class WithProcessors(Worker):  # requests name their logits processors (a server's carry numbers only)
        def insert_row(self, prompt, request):
            processors = request.pop("logits_processors")
            return self.engine.insert(prompt, logits_processors=processors, **request)

    # MLX arrays belong to the thread that made them: the model loads in the generation thread.
    worker = WithProcessors(lambda: SimpleNamespace(engine=BatchEngine(*load(), prompt_cache=PromptCache(4, 1 << 30))))

    def broken(tokens, logits):  # fails once the row has handed out tokens
        if tokens.size > len(tokenizer.encode(PROMPT)) + 6:
            raise RuntimeError("processor broke")
        return logits

    async def ask(processors):
        job = Job(tokenizer.encode(PROMPT), dict(max_tokens=12, logits_processors=processors), [], 0, False,
                  tokenizer.detokenizer, tokenizer.decode, set(tokenizer.eos_token_ids), 4,
                  asyncio.get_running_loop())
        worker.submit(job)
        while True:
            delta = await asyncio.wait_for(job.queue.get(), timeout=60)
            if delta.finish_reason:
                return delta

    async def scenario():
        failed = await ask([broken])
        good = await ask([])
        return failed, good

    worker.start()
    try:
        assert worker.ready.wait(120) and not worker.load_error
        tokenizer = worker.engine.tokenizer
        failed, good = asyncio.run(scenario())
    finally:
        worker.stop()
    assert failed.finish_reason == "error" and "processor broke" in failed.error
    assert failed.usage is None and failed.text == ""
    assert good.finish_reason == "length" and good.usage["completion_tokens"] == 12
    # The prompt's K/V (stored once prefilled, as both rows' prompts are the same) and the good
    # row's whole cache; nothing from where the broken row failed.
    prompt = len(tokenizer.encode(PROMPT))
    assert sorted(map(len, worker.engine.prompt_cache.entries)) == [prompt, prompt + 11]
