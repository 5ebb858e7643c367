"""Tensor parallelism over mlx.distributed: two real processes (ring backend on 127.0.0.1,
started as `mlx.launch` starts them) give the single-process output, token for token; the
CLI's commands under `mlx.launch` itself."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import pytest
from mlx_lm.sample_utils import make_logits_processors

from gemma_mtp_mlx import generate, load
from gemma_mtp_mlx.batch import BatchEngine
from gemma_mtp_mlx.generate import encode_prompt

# E2B-like (per-layer inputs, KV sharing), 31B-like (K=V, global K/V heads), 26B-like MoE,
# and the 12B family (gemma4_unified: multimodal layout, and its text config as transformers saves it).
SPLIT_PAIRS = ["e2b", "dense", "moe", "unified", "unified_text"]

WINDOW = 16
MAX_TOKENS = 3 * WINDOW + 12  # past 3x the sliding window
RUNS_SECONDS = 900  # per run (one process, then two ranks); measured: both together 190 s on a busy 2-core host
NEAR_TIE = 1e-4  # all-reduce sums in another order: only a top-2 gap below this may flip
WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
LAUNCH = Path(sys.executable).parent / "mlx.launch"
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def launch(n: int, *command, timeout: float = 600, **kwargs):
    return subprocess.run([str(LAUNCH), "-n", str(n), "--backend", "ring", "--", sys.executable, *map(str, command)],
                          capture_output=True, text=True, timeout=timeout, env=ENV, **kwargs)


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def ring_ranks(n: int, *command, workdir: Path, timeout: float) -> list:
    """Run `command` as the n ranks of a ring on 127.0.0.1 (one lone process for n = 1), set up
    as `mlx.launch` sets them up (MLX_RANK, MLX_HOSTFILE), and return their exit codes (None
    for a rank still running when another failed or time ran out: it is killed). Each rank's
    output goes to workdir/rank<r>.log. Not through mlx.launch itself: its output relay polls
    without pause and takes one of the two cores of a CI runner (the CLI tests below still go
    through it)."""
    hostfile = workdir / "hosts.json"
    if n > 1:
        hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in free_ports(n)]))
    ranks = []
    for rank in range(n):
        env = {**ENV, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)} if n > 1 else ENV
        with open(workdir / f"rank{rank}.log", "w") as log:
            ranks.append(subprocess.Popen([sys.executable, *map(str, command)], stdout=log,
                                          stderr=subprocess.STDOUT, env=env))
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            codes = [rank.poll() for rank in ranks]
            if None not in codes or any(codes):  # all done, or one failed: the others would wait forever
                return codes
            time.sleep(0.5)
        return [rank.poll() for rank in ranks]
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
                rank.wait()


@pytest.fixture(scope="module")
def runs(pairs, tmp_path_factory):
    """Every fixture pair run by one process and by two ranks: {1: [rank0], 2: [rank0, rank1]}."""
    rng = np.random.default_rng(19)
    spec = dict(
        pairs={name: [str(pairs[name][0]), str(pairs[name][1])] for name in SPLIT_PAIRS},
        prompts=[rng.integers(3, 256, size=n).tolist() for n in (5, 2 * WINDOW - 3)],
        ks=[1, 4], max_tokens=MAX_TOKENS, seeded=dict(temp=1.0, seed=5, k=3),
    )
    root = tmp_path_factory.mktemp("distributed")
    (root / "spec.json").write_text(json.dumps(spec))
    out = {}
    for n in (1, 2):
        (root / str(n)).mkdir()
        codes = ring_ranks(n, WORKER, root / "spec.json", root / str(n), workdir=root / str(n), timeout=RUNS_SECONDS)
        logs = "".join((root / str(n) / f"rank{r}.log").read_text()[-3000:] for r in range(n))
        assert codes == [0] * n, logs
        out[n] = [json.loads((root / str(n) / f"rank{r}.json").read_text()) for r in range(n)]
    return out


def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def test_two_ranks_give_single_process_greedy_output_and_telemetry(runs):
    excused = []
    for name in SPLIT_PAIRS:
        single = runs[1][0]["pairs"][name]["runs"]
        for rank in runs[2]:
            for i, (ref, got) in enumerate(zip(single, rank["pairs"][name]["runs"])):
                for mode in ("k1", "k4"):
                    at = first_difference(ref[mode]["tokens"], got[mode]["tokens"])
                    if at is None:
                        assert got[mode]["rounds"] == ref[mode]["rounds"], f"{name} prompt {i} {mode}"
                        continue
                    # Only a float32 near-tie of the single-process target may flip.
                    assert ref["gaps"][at] < NEAR_TIE, f"{name} prompt {i} {mode}: differs at {at}"
                    excused.append((name, i, mode, at))
    assert len(excused) <= 2, excused  # report: near-ties are rare on these fixtures


def test_sampled_output_with_a_seed_is_identical_on_every_rank(runs):
    for name in SPLIT_PAIRS:
        ranks = [r["pairs"][name]["runs"] for r in runs[2]]
        for a, b in zip(*ranks):
            assert a["seeded"]["tokens"] == b["seeded"]["tokens"]
            assert a["seeded"]["rounds"] == b["seeded"]["rounds"]
            assert len(a["seeded"]["tokens"]) == MAX_TOKENS


def test_each_rank_holds_about_half_of_the_split_weights(runs):
    for name in SPLIT_PAIRS:
        whole = runs[1][0]["pairs"][name]["split_bytes"]
        for rank in runs[2]:
            share = rank["pairs"][name]["split_bytes"] / whole
            # K/V heads fewer than the ranks are kept whole on each rank: a little over 1/2.
            assert 0.5 <= share < 0.6, (name, share)


def test_ranks_that_cannot_split_the_heads_are_refused_with_a_clear_error(pairs):
    target, assistant = pairs["dense"]  # 4 query heads: 3 ranks cannot share them
    done = launch(3, "-m", "gemma_mtp_mlx", "generate", "--model", target, "--draft-model", assistant,
                  "--prompt", "hello", "--no-chat-template", "--max-tokens", "4", timeout=300)
    # (mlx.launch itself exits 0 whatever its ranks did: the message is what counts)
    assert "cannot split" in done.stderr and "4 query heads" in done.stderr and "Traceback" not in done.stderr


def test_bench_under_a_launch_measures_on_every_rank_and_reports_once_with_the_rank_count(pairs, tmp_path):
    target, assistant = pairs["dense"]
    (tmp_path / "prompts.txt").write_text("hello world\n")
    done = launch(2, "-m", "gemma_mtp_mlx", "bench", "--model", target, "--draft-model", assistant,
                  "--prompts", tmp_path / "prompts.txt", "--ks", "2", "--temps", "0", "--max-tokens", "8",
                  "--repeats", "1", "--out", tmp_path / "out", timeout=300)
    assert done.stdout.count("wrote ") == 1 and done.stdout.count("| k=2 t=0 |") == 1, done.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bench.json", "bench.md"]
    result = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert result["machine"]["ranks"] == 2 and result["exactness"]["ok"]
    assert "- ranks: 2 (tensor-parallel" in (tmp_path / "out" / "bench.md").read_text()


def test_serve_under_a_launch_answers_like_single_process_generate_and_stops_cleanly(pairs, tmp_path):
    target, assistant = pairs["dense"]
    prompts, max_tokens = ["hello there", "the quick brown fox"], 3 * WINDOW + 4
    model, tokenizer, drafter = load(target, draft_model=assistant)
    expected = [generate(model, tokenizer, p, draft_model=drafter, max_tokens=max_tokens) for p in prompts]
    # sampled, with a penalty: every rank must draw with the same seed and rebuild the penalty (the
    # reference is a lone engine: its rows draw differently from generate's)
    expected_sampled = lone_engine_text(model, tokenizer, drafter, prompts[0], max_tokens=max_tokens, temp=1.0,
                                        seed=7, logits_processors=make_logits_processors(repetition_penalty=1.3))
    port = free_ports(1)[0]
    log = open(tmp_path / "serve.log", "w+")
    child = subprocess.Popen(
        [str(LAUNCH), "-n", "2", "--backend", "ring", "--", sys.executable, "-m", "gemma_mtp_mlx", "serve",
         "--model", str(target), "--draft-model", str(assistant), "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, text=True, env=ENV, start_new_session=True)
    try:
        wait_until_healthy(child, port, log)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)

        def complete(prompt, stream=False, temperature=0, **extra):
            reply = client.completions.create(model="m", prompt=prompt, max_tokens=max_tokens, stream=stream,
                                              temperature=temperature, extra_body=extra)
            return "".join(c.choices[0].text for c in reply if c.choices) if stream else reply.choices[0].text

        assert [complete(p) for p in prompts] == expected
        assert complete(prompts[0], temperature=1.0, seed=7, repetition_penalty=1.3) == expected_sampled
        with ThreadPoolExecutor(2) as pool:  # two rows in one batch, on both ranks
            assert list(pool.map(lambda p: complete(p, stream=True), prompts)) == expected
        with pytest.raises(openai.BadRequestError, match="fixed draft length under mlx.launch"):
            complete(prompts[0], num_draft_tokens="auto")  # each rank would choose its own k
        assert complete(prompts[1]) == expected[1]  # and the ranks still agree
        os.kill(rank_pid(0), signal.SIGTERM)  # as a service manager stops a server
        child.wait(timeout=60)
        log.seek(0)
        output = log.read()
        # rank 1 ended when rank 0 told it to (rank 0 ends as uvicorn does on SIGTERM)
        assert "Traceback" not in output and "error" not in output and "rank 1" not in output, output[-3000:]
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)


def lone_engine_text(model, tokenizer, drafter, prompt: str, **options) -> str:
    """What a single-process server's engine generates for one request."""
    engine = BatchEngine(model, tokenizer, drafter)
    engine.insert(encode_prompt(tokenizer, prompt).tolist(), **options)
    tokens = []
    while engine.has_work:
        tokens += [t for event in engine.step() for t in event.tokens]
    return tokenizer.decode(tokens)


def wait_until_healthy(child, port: int, log, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert child.poll() is None, open(log.name).read()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"the server did not become ready: {open(log.name).read()[-3000:]}")


def test_a_rank_that_dies_mid_generation_ends_the_run_with_a_clear_error(pairs, tmp_path):
    target, assistant = pairs["e2b"]
    child = subprocess.Popen(
        [str(LAUNCH), "-n", "2", "--backend", "ring", "--", sys.executable, "-m", "gemma_mtp_mlx", "generate",
         "--model", str(target), "--draft-model", str(assistant), "--prompt", "hello", "--no-chat-template",
         "--max-tokens", "100000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)
    try:
        os.set_blocking(child.stdout.fileno(), False)
        deadline = time.monotonic() + 300
        while not child.stdout.read(1):  # rank 0 streams: generation is under way
            assert child.poll() is None and time.monotonic() < deadline, child.stderr.read()
            time.sleep(0.2)
        victim = rank_pid(1)
        os.kill(victim, signal.SIGKILL)
        started = time.monotonic()
        child.wait(timeout=60)
        assert time.monotonic() - started < 60
        stderr = child.stderr.read()
        # The launcher names the rank that died; the survivor stops (MLX's ring reports the
        # closed peer, and our watchdog line follows when the launcher still forwards it).
        assert "rank 1 exited" in stderr and "Traceback" not in stderr, stderr[-2000:]
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)


def rank_pid(rank: int) -> int:
    """The pid of our `gemma_mtp_mlx` process started as `rank` by mlx.launch."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"gemma_mtp_mlx" in cmdline and f"MLX_RANK={rank}".encode() in environ:
            return int(proc.name)
    raise AssertionError(f"no process for rank {rank}")
