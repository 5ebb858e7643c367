"""One rank of a tensor-parallel run, for tests/test_distributed.py (not a test itself).

Usage: python distributed_worker.py SPEC.json OUT_DIR
Run alone it is the single-process reference; as the N ranks of a ring (MLX_RANK, MLX_HOSTFILE,
as `mlx.launch -n N` or test_distributed.ring_ranks sets them) every rank runs it.
SPEC: {"pairs": {name: [target_dir, assistant_dir]}, "prompts": [[ids]...], "ks": [...],
"max_tokens": n, "seeded": {"temp": t, "seed": s, "k": k}}. Each rank writes
OUT_DIR/rank<r>.json with every run's tokens and round log, the bytes of its split weights
and, on a single process, the top-2 logit gap at every generated position.
"""

import json
import os
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from gemma_mtp_mlx import stream_generate
from gemma_mtp_mlx.distributed import load_sharded, world

SPLIT = ("q_proj", "o_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")


def split_bytes(model) -> int:
    """Bytes of the parameters that tensor parallelism splits (attention and MLP/experts)."""
    from mlx.utils import tree_flatten

    return sum(v.nbytes for k, v in tree_flatten(model.parameters()) if any(s in k for s in SPLIT))


def run(target, tokenizer, drafter, prompt, max_tokens, **options):
    responses = list(stream_generate(target, tokenizer, prompt, draft_model=drafter, max_tokens=max_tokens,
                                     record_rounds=drafter is not None, **options))
    log = responses[-1].stats.rounds_log
    return dict(tokens=[r.token for r in responses], rounds=log)


def top2_gaps(target, ids):
    """Top-2 logit gap of the target at every position of `ids` (one full forward)."""
    from mlx_lm.models.cache import KVCache

    cache = [KVCache() for _ in range(target.args.num_hidden_layers - target.args.num_kv_shared_layers)]
    logits, _ = target(mx.array([ids]), cache)
    top = np.sort(np.array(logits[0].astype(mx.float32)), axis=-1)[:, -2:]
    return (top[:, 1] - top[:, 0]).tolist()


def main():
    spec = json.loads(Path(sys.argv[1]).read_text())
    out_dir = Path(sys.argv[2])
    group = world()
    result = dict(size=group.size(), rank=group.rank(), pairs={})
    for name, (target_dir, assistant_dir) in spec["pairs"].items():
        target, tokenizer, drafter = load_sharded(target_dir, assistant_dir, group=group)
        runs = []
        for prompt in spec["prompts"]:
            entry = {}
            for k in spec["ks"]:
                entry[f"k{k}"] = run(target, tokenizer, drafter, prompt, spec["max_tokens"], num_draft_tokens=k)
            seeded = spec["seeded"]
            entry["seeded"] = run(target, tokenizer, drafter, prompt, spec["max_tokens"],
                                  num_draft_tokens=seeded["k"], temp=seeded["temp"], seed=seeded["seed"])
            if group.size() == 1:  # where plain decoding had a near-tie (plain == k1 here)
                plain = run(target, tokenizer, None, prompt, spec["max_tokens"])["tokens"]
                assert plain == entry[f"k{spec['ks'][0]}"]["tokens"]
                entry["gaps"] = top2_gaps(target, prompt + plain)[len(prompt) - 1:]
            runs.append(entry)
        result["pairs"][name] = dict(runs=runs, split_bytes=split_bytes(target.model))
    (out_dir / f"rank{group.rank()}.json").write_text(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (tens of seconds with a live ring group)


if __name__ == "__main__":
    main()
