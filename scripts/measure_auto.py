"""Is `num_draft_tokens="auto"` as fast as the best fixed k? Measured on a busy machine.

`gemma-mtp bench` interleaves whole configurations (every prompt of one, then the next);
on a shared machine whose load swings within a minute that is not fine enough to tell 3%.
Here every prompt runs under every configuration back to back, in an order that rotates
with the prompt and the repeat, so each configuration's time on a prompt is paired with the
others' on the same prompt within seconds. Greedy decoding (the default): every
configuration emits the same tokens (output is exact), so times compare directly. With
`--temp`, each prompt has its own seed and configurations emit different tokens: times per
token compare.

    LD_PRELOAD=.../libopenblas.so.0 python scripts/measure_auto.py --prompts FILE.jsonl \
        --ks 2,3,4,6,8 --max-tokens 64 --repeats 3 [--temp 0.7] [--model M --draft-model D]

Prints, per configuration, tokens/s (median over repeats, with min and max) and the
median over (repeat, prompt) pairs of its time per token over auto's on the same prompt.
"""

import argparse
import json
import statistics
import sys
import time

from gemma_mtp_mlx import load, stream_generate
from gemma_mtp_mlx.bench.benchmark import blas_info, read_prompts
from gemma_mtp_mlx.loading import DEFAULT_PROMPTS_FILE


def run(model, tokenizer, drafter, prompt, k, max_tokens, temp=0.0, seed=None):
    tic = time.perf_counter()
    last = None
    for last in stream_generate(model, tokenizer, prompt, draft_model=drafter if k else None,
                                num_draft_tokens=k or None, max_tokens=max_tokens, temp=temp, seed=seed):
        if last.generation_tokens == 1:
            tic = time.perf_counter()  # generation time, as bench: prefill excluded
    return last.generation_tokens - 1, time.perf_counter() - tic, last.stats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--draft-model", default=None)
    parser.add_argument("--prompts", default=None)
    parser.add_argument("--ks", default="2,3,4,6,8")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--temp", type=float, default=0.0, help="sampling temperature (seed: the prompt's index)")
    parser.add_argument("--out", default=None, help="write everything as JSON here")
    args = parser.parse_args(argv)
    model, tokenizer, drafter = load(args.model, args.draft_model)
    prompts = read_prompts(args.prompts or DEFAULT_PROMPTS_FILE)
    configs = [0] + [int(k) for k in args.ks.split(",")] + ["auto"]
    for k in configs:  # warm-up (auto also learns this machine's round times here)
        for prompt in prompts[:3]:
            run(model, tokenizer, drafter, prompt, k, 16, args.temp, 0)
    seconds = {k: [[0.0] * len(prompts) for _ in range(args.repeats)] for k in configs}
    tokens = {k: [[0] * len(prompts) for _ in range(args.repeats)] for k in configs}
    rounds_by_k = []
    for r in range(args.repeats):
        for p, prompt in enumerate(prompts):
            shift = (r * len(prompts) + p) % len(configs)
            for k in configs[shift:] + configs[:shift]:
                n, s, stats = run(model, tokenizer, drafter, prompt, k, args.max_tokens, args.temp, p)
                tokens[k][r][p], seconds[k][r][p] = n, s
                if k == "auto":
                    rounds_by_k.append(stats.rounds_by_k)
        print(f"repeat {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)
        report(args, prompts, configs, tokens, seconds, rounds_by_k, r + 1)


def report(args, prompts, configs, tokens, seconds, rounds_by_k, repeats):
    """Print (and write) the results of the first `repeats` repeats."""
    name = lambda k: "plain" if k == 0 else f"k={k}"
    result = dict(blas=blas_info()["name"], prompts=len(prompts), max_tokens=args.max_tokens,
                  temp=args.temp, repeats=repeats, configs={})
    per_token = lambda k, r, p: seconds[k][r][p] / max(tokens[k][r][p], 1)
    for k in configs:
        by_repeat = [sum(tokens[k][r]) / sum(seconds[k][r]) for r in range(repeats)]
        over_auto = [per_token(k, r, p) / per_token("auto", r, p) for r in range(repeats) for p in range(len(prompts))]
        result["configs"][name(k)] = dict(
            tokens_per_s=statistics.median(by_repeat), tokens_per_s_by_repeat=by_repeat,
            time_over_auto_median=statistics.median(over_auto),
            time_over_auto_quartiles=statistics.quantiles(over_auto, n=4))
    result["auto_rounds_by_k"] = [sum(c) for c in zip(*rounds_by_k)]
    for label, r in result["configs"].items():
        spread = f"{min(r['tokens_per_s_by_repeat']):.1f}-{max(r['tokens_per_s_by_repeat']):.1f}"
        q = r["time_over_auto_quartiles"]
        print(f"{label:>6}: {r['tokens_per_s']:6.1f} tokens/s (repeats {spread}); time / auto's on the same "
              f"prompt, per token: median {r['time_over_auto_median']:.3f} (quartiles {q[0]:.3f}-{q[2]:.3f})")
    print(f"  auto rounds by k: {result['auto_rounds_by_k']} ({repeats} repeats)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
