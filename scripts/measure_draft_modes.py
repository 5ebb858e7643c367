"""Mean accepted length of greedy vs sampled drafting: the default pair, the fixture pairs (README table).

Run: .venv/bin/python scripts/measure_draft_modes.py   (builds the fixtures if scripts/test has not)
"""

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import batched_rounds  # noqa: E402
from hf_reference import cached_fixture_dir  # noqa: E402

from gemma_mtp_mlx import load, stream_generate  # noqa: E402
from gemma_mtp_mlx.bench.benchmark import read_prompts  # noqa: E402
from gemma_mtp_mlx.loading import DEFAULT_PROMPTS_FILE  # noqa: E402
from gemma_mtp_mlx.sampling import Sampling  # noqa: E402

MODES = ("greedy", "sampled")
AGREEING_PROMPT = [2, 40, 41, 42]  # test_sampling.py's prompt


def fixture_pairs(fixtures):
    for target, drafter in (("e2b_target", "assistant_centroid"), ("dense_target", "assistant_dense")):
        yield target, load(fixtures / target, draft_model=fixtures / drafter)


def default_pair_rows():
    """The shipped pair on its first 8 held-out prompts, 100 tokens each, k=4."""
    target, tokenizer, drafter = load()
    prompts = read_prompts(DEFAULT_PROMPTS_FILE)[:8]
    for temp in (0.7, 1.0):
        lengths = []
        for mode in MODES:
            runs = [
                list(stream_generate(target, tokenizer, p, draft_model=drafter, num_draft_tokens=4, max_tokens=100,
                                     temp=temp, draft_mode=mode, seed=s))
                for s, p in enumerate(prompts)
            ]
            lengths.append(np.mean([r[-1].stats.mean_accepted_length for r in runs]))
        print(f"| default pair (k=4) | {temp} | " + " | ".join(f"{x:.3f}" for x in lengths) + " |")


def main():
    fixtures = cached_fixture_dir()
    print("| pair | temp | " + " | ".join(f"{m} drafting" for m in MODES) + " |")
    default_pair_rows()
    for name, (target, tokenizer, drafter) in fixture_pairs(fixtures):
        for temp in (0.7, 1.0):
            lengths = []
            for mode in MODES:
                runs = [
                    list(stream_generate(target, tokenizer, list(range(10 + s, 30 + s)), draft_model=drafter,
                                         num_draft_tokens=4, max_tokens=100, temp=temp, draft_mode=mode, seed=s))
                    for s in range(5)
                ]
                lengths.append(np.mean([r[-1].stats.mean_accepted_length for r in runs]))
            print(f"| {name} (k=4) | {temp} | " + " | ".join(f"{x:.3f}" for x in lengths) + " |")

    target = load(fixtures / "e2b_target")[0]
    state = batched_rounds.PromptState(target, AGREEING_PROMPT)
    n = 20_000
    for temp in (0.7, 1.0):
        lengths = []
        for mode in MODES:
            sampling = Sampling(temp=temp, draft_mode=mode)
            mx.random.seed(0)
            logp = mx.broadcast_to(batched_rounds.processed(sampling, state.logits[:, -1]), (n, state.logits.shape[-1]))
            first = np.array(sampling.sample(logp)).astype(np.int64)
            accepted, _, _ = batched_rounds.speculative_round(state, batched_rounds.target_as_drafter, sampling,
                                                              np.zeros((n, 0), np.int64), first, k=2)
            lengths.append(accepted.mean() + 1)
        print(f"| e2b_target + agreeing drafter (k=2) | {temp} | " + " | ".join(f"{x:.3f}" for x in lengths) + " |")


if __name__ == "__main__":
    main()
