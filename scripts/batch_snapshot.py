"""Everything the batch engine hands out on every fixture pair and the default pair, as
JSON: per step, each event's uid, tokens, log-probabilities, top log-probabilities, draft
flags, finish reason, drafted count and cached tokens, and each finished row's statistics
(timings left out). Run before and after a change to the engine and compare:

    .venv/bin/python scripts/batch_snapshot.py before.json      # on the old commit
    .venv/bin/python scripts/batch_snapshot.py after.json       # on the new one
    .venv/bin/python scripts/batch_snapshot.py --compare before.json after.json

The schedule covers greedy and sampled rows (seeded), k in {1, 3, auto} and plain, rows
joining mid-generation and one leaving, logits processors with top log-probabilities, and
the server's prompt cache (a second turn starting from the first one's entry). `auto`
chooses its k from round times, so its runs are compared by their greedy rows' tokens.
"""

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

TIMINGS = {"prompt_tps", "generation_tps", "peak_memory"}


def _stats(stats) -> dict:
    return {k: v for k, v in stats.to_dict().items() if k not in TIMINGS}


def _event(e) -> dict:
    return {"uid": e.uid, "tokens": e.tokens, "logprobs": e.logprobs, "top": e.top_logprobs,
            "from_draft": e.from_draft, "finish": e.finish_reason, "drafted": e.drafted,
            "cached": e.cached_tokens, "stats": _stats(e.stats) if e.stats else None}


def _run(engine, schedule) -> list:
    steps, step = [], 0
    while engine.has_work or any(s >= step for s in schedule):
        for action in schedule.get(step, []):
            action()
        steps.append([_event(e) for e in engine.step()])
        step += 1
    return steps


def snapshot_pair(target, tokenizer, drafter, window: int) -> dict:
    from mlx_lm.sample_utils import make_logits_processors
    from gemma_mtp_mlx import BatchEngine
    from gemma_mtp_mlx.server.prompt_cache import PromptCache

    rng = np.random.default_rng(0)
    vocab = min(target.vocab_size if hasattr(target, "vocab_size") else 256, 256)
    prompts = [rng.integers(3, vocab, size=n).tolist() for n in (1, 2 * window + 5, 9, 40, 13)]
    out = {}
    for name, k in (("plain", None), ("k1", 1), ("k3", 3), ("auto", "auto")):
        engine = BatchEngine(target, tokenizer, None if k is None else drafter,
                             num_draft_tokens=k, max_batch_size=3, prefill_step_size=16)
        uids = {}

        def insert(i, n, **options):
            return lambda: uids.setdefault(i, engine.insert(prompts[i], max_tokens=n, **options))

        schedule = {
            0: [insert(0, 3 * window + 12), insert(1, 20, temp=0.8, seed=5)],
            2: [insert(2, 3 * window + 4, logits_processors=make_logits_processors(repetition_penalty=1.3),
                       top_logprobs=3)],
            4: [insert(3, 1), insert(4, 30, temp=1.0, top_p=0.9, seed=7, draft_mode="greedy")],
            7: [lambda: engine.remove(uids[0])],
        }
        out[name] = _run(engine, schedule)
    cache = PromptCache(8, 1 << 30)
    engine = BatchEngine(target, tokenizer, drafter, num_draft_tokens=3, max_batch_size=4,
                         prompt_cache=cache, prefill_step_size=9)
    first = _run(engine, {0: [lambda: engine.insert(prompts[1], max_tokens=2 * window)]})
    reply = [t for step in first for e in step for t in e["tokens"]]
    turn = prompts[1] + reply + [7, 8, 9]
    second = _run(engine, {0: [lambda: engine.insert(turn, max_tokens=3 * window),
                               lambda: engine.insert(prompts[2], max_tokens=20, temp=0.7, seed=1)]})
    out["prompt_cache"] = first + second
    return out


def snapshot() -> dict:
    from conftest import PAIRS, WINDOW
    from hf_reference import cached_fixture_dir
    from gemma_mtp_mlx import load

    fixtures = cached_fixture_dir()
    result = {}
    for name, (target, assistant) in PAIRS.items():
        mx.random.seed(0)
        result[name] = snapshot_pair(*load(fixtures / target, draft_model=fixtures / assistant), WINDOW)
    mx.random.seed(0)
    model, tokenizer, drafter = load()
    result["default"] = snapshot_pair(model, tokenizer, drafter, model.args.sliding_window)
    return result


def _tokens(steps) -> dict:
    out = {}
    for step in steps:
        for e in step:
            out.setdefault(e["uid"], []).extend(e["tokens"])
    return out


def _same_greedy_tokens(a, b) -> bool:
    """`auto` chooses each round's k from measured round times, so two runs of the same
    code may draft differently: there only the greedy rows' tokens must agree (rows 3 and
    4 whole; row 1, removed after a fixed number of steps, up to the shorter of the two)."""
    a, b = _tokens(a), _tokens(b)
    n = min(len(a[1]), len(b[1]))
    return a[3] == b[3] and a[4] == b[4] and a[1][:n] == b[1][:n]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", help="where to write the snapshot")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(Path(p).read_text()) for p in args.compare)
        same = True
        for pair in before:
            for run in before[pair]:
                a, b = before[pair][run], after.get(pair, {}).get(run)
                if a != b and not (run == "auto" and _same_greedy_tokens(a, b)):
                    print(f"differs: {pair} {run}")
                    same = False
        print("identical" if same else "DIFFERENT")
        return 0 if same else 1
    Path(args.out).write_text(json.dumps(snapshot()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
