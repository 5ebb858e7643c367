"""`gemma-mtp bench --batch-sizes`: aggregate tokens/s of batched decoding.

For each batch size B the same B prompts run through mlx-lm's own `batch_generate` (its
`BatchGenerator`, plain decoding of the same target), our `BatchEngine` without a drafter,
our engine with the drafter for each k, and single-stream speculative decoding of the B
prompts one after another (the first k; what a server without batching does, and at B = 1
the single-stream path the engine must not be slower than); greedy, interleaved repeats (every
configuration once per repeat, alternating direction). Aggregate tokens/s is all rows'
generated tokens over the wall time of the whole batch, prefill included.
"""

import statistics
import time
from typing import Callable, List, Optional, Sequence

import mlx.core as mx
import mlx_lm

from ..adaptive import AUTO
from ..batch import batch_generate
from ..generate import stream_generate


def _run(config: str, target, tokenizer, drafter, prompts: List[List[int]], max_tokens: int):
    """(generated tokens, seconds, mean accepted length or None) of one batch."""
    tic = time.perf_counter()
    if config == "mlx-lm":
        out = mlx_lm.batch_generate(target.model, tokenizer, prompts, max_tokens=max_tokens, return_token_ids=True)
        return sum(map(len, out.token_ids)), time.perf_counter() - tic, None
    k = None if config == "plain" else _draft_length(config.split("=")[1])
    if config.startswith("one at a time"):
        out = [[r.token for r in stream_generate(target, tokenizer, p, draft_model=drafter, num_draft_tokens=k,
                                                 max_tokens=max_tokens)] for p in prompts]
        return sum(map(len, out)), time.perf_counter() - tic, None
    out = batch_generate(target, tokenizer, prompts, draft_model=drafter if k else None, num_draft_tokens=k,
                         max_tokens=max_tokens, return_token_ids=True)
    seconds = time.perf_counter() - tic
    return sum(map(len, out.token_ids)), seconds, out.pooled_stats.mean_accepted_length if k else None


def _draft_length(text: str):
    return text if text == AUTO else int(text)


def run_batch_benchmark(target, tokenizer, drafter, prompts: List[List[int]], *, batch_sizes: Sequence[int],
                        ks: Sequence[int], max_tokens: int = 128, repeats: int = 3,
                        progress: Optional[Callable[[str], None]] = None) -> dict:
    """Rows {batch_size, config, tokens_per_s (median), ratio (to mlx-lm's), mean_accepted_length}."""
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"--batch-sizes must be positive integers, got {list(batch_sizes)}")
    report = progress or (lambda line: None)
    configs = ["mlx-lm", "plain"] + [f"k={k}" for k in ks] + [f"one at a time k={ks[0]}"] * bool(ks)
    batches = {B: [prompts[i % len(prompts)] for i in range(B)] for B in batch_sizes}
    report("warming up")
    for config in configs:
        _run(config, target, tokenizer, drafter, batches[min(batch_sizes)], 8)
    runs = {(B, c): [] for B in batch_sizes for c in configs}
    for repeat in range(repeats):
        for B in batch_sizes:
            for config in configs if repeat % 2 == 0 else configs[::-1]:
                mx.clear_cache()
                runs[B, config].append(_run(config, target, tokenizer, drafter, batches[B], max_tokens))
                tokens, seconds, _ = runs[B, config][-1]
                report(f"repeat {repeat + 1}/{repeats} B={B} {config}: {tokens / seconds:.1f} tokens/s")
    rows = []
    for B in batch_sizes:
        baseline = statistics.median(t / s for t, s, _ in runs[B, "mlx-lm"])
        for config in configs:
            tps = statistics.median(t / s for t, s, _ in runs[B, config])
            accepted = [a for _, _, a in runs[B, config] if a is not None]
            rows.append(dict(batch_size=B, config=config, tokens_per_s=tps, ratio=tps / baseline,
                             mean_accepted_length=statistics.mean(accepted) if accepted else None))
    return dict(settings=dict(batch_sizes=list(batch_sizes), ks=list(ks), max_tokens=max_tokens, repeats=repeats,
                              prompt_tokens=[len(p) for p in prompts[: max(batch_sizes)]]),
                rows=rows)


def batch_markdown_table(result: dict) -> str:
    lines = ["| B | decoding | tokens/s (all rows) | vs mlx-lm batched | mean accepted length |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        accepted = "" if r["mean_accepted_length"] is None else f"{r['mean_accepted_length']:.2f}"
        name = {"mlx-lm": "mlx-lm BatchGenerator", "plain": "ours, no drafter"}.get(r["config"], r["config"])
        lines.append(f"| {r['batch_size']} | {name} | {r['tokens_per_s']:.1f} | {r['ratio']:.2f}x | {accepted} |")
    return "\n".join(lines)
