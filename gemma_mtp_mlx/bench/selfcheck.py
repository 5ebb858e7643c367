"""The exactness self-check: is speculative output identical to plain output for this
pair, dtype and machine?

Speculation is exact only if a verify forward of k + 1 tokens computes the same logits as
decoding those positions one by one. Matmul kernels need not agree: on newer Apple GPUs a
quantized matmul over several rows sums in another order than the one-row kernel, so
greedy output can change at near-ties (DESIGN.md 10). The check measures both sides: it
generates each prompt with and without the drafter and compares the tokens, and it
compares one (k + 1)-token verify's logits with the same positions decoded one at a time.
`gemma-mtp bench` reports it; `gemma-mtp doctor` runs only this.
"""

import argparse
import json
import sys
from typing import List, Sequence, Union

import mlx.core as mx

from ..arguments import add_pair_options
from ..cache import rollback_cache
from ..generate import chat_prompt, encode_prompt, stream_generate
from ..loading import DEFAULT_MODEL, DEFAULT_PROMPTS_FILE, as_target, load
from ..target import Target

DOCTOR_PROMPTS = 4
DOCTOR_MAX_TOKENS = 32
BUILT_IN_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]


def exactness_check(target, tokenizer, drafter, prompts: Sequence[Union[str, List[int]]], *,
                    num_draft_tokens: int, max_tokens: int = DOCTOR_MAX_TOKENS) -> dict:
    """Greedy speculative vs plain output on every prompt, and verify vs decode logits.

    Returns `identical` (prompts whose outputs are equal), `prompts`, `first_divergence`
    (per prompt: the index of the first differing token, or None), `max_logit_gap`
    (largest |verify logits - one-by-one decode logits| over the prompts' first k + 1
    generated positions), `argmax_agrees` (the top token agrees at every such position),
    `k`, `dtype` and `ok` (every output identical and every top token agreeing).
    """
    target = as_target(target)
    k = num_draft_tokens
    divergence, gap, agrees = [], 0.0, True
    for prompt in prompts:
        ids = encode_prompt(tokenizer, prompt).tolist()
        plain = [r.token for r in stream_generate(target, tokenizer, ids, max_tokens=max_tokens)]
        spec = [r.token for r in stream_generate(target, tokenizer, ids, draft_model=drafter,
                                                 num_draft_tokens=k, max_tokens=max_tokens)]
        divergence.append(first_difference(plain, spec))
        block = ([ids[-1]] + plain)[: k + 1]  # what a verify pass after the prompt would see
        prompt_gap, prompt_agrees = verify_decode_gap(target, ids[:-1], block, k)
        gap, agrees = max(gap, prompt_gap), agrees and prompt_agrees
    identical = sum(d is None for d in divergence)
    return dict(ok=identical == len(divergence) and agrees, identical=identical, prompts=len(divergence),
                first_divergence=divergence, max_logit_gap=gap, argmax_agrees=agrees, k=k,
                dtype=_dtype(target), max_tokens=max_tokens)


def verify_decode_gap(target: Target, prefix: List[int], block: List[int], k: int):
    """(largest |logit difference|, whether the argmax agrees everywhere) between one
    forward over `block` and decoding `block` one token at a time, after `prefix`."""
    cache = target.make_cache(k)
    if prefix:
        mx.eval(target(mx.array([prefix]), cache))
    verified, _ = target(mx.array([block]), cache)  # [1, L, vocab]
    mx.eval(verified)
    rollback_cache(cache, len(prefix))
    decoded = mx.concatenate([target(mx.array([[t]]), cache)[0] for t in block], axis=1)
    verified, decoded = verified.astype(mx.float32), decoded.astype(mx.float32)
    gap = mx.abs(verified - decoded).max().item()
    agrees = (mx.argmax(verified, axis=-1) == mx.argmax(decoded, axis=-1)).all().item()
    return gap, bool(agrees)


def first_difference(a: List[int], b: List[int]):
    """The first index where `a` and `b` differ (the shorter one's length if one is a
    prefix of the other), or None if they are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _dtype(target: Target) -> str:
    embed = target.backbone.embed_tokens
    if hasattr(embed, "bits"):
        return f"{embed.bits}-bit"
    return str(embed.weight.dtype).replace("mlx.core.", "")


def describe(check: dict) -> str:
    """What the check found and what it means, for people."""
    lines = [
        f"speculative output == plain output on {check['identical']}/{check['prompts']} prompts "
        f"(greedy, k={check['k']}, {check['max_tokens']} tokens, {check['dtype']}, {mx.default_device()})",
        f"largest |verify logits - one-by-one decode logits|: {check['max_logit_gap']:.3g} "
        f"(top token {'agrees' if check['argmax_agrees'] else 'DIFFERS'} at every checked position)",
    ]
    if check["ok"]:
        lines.append(
            "OK: a (k+1)-token verify computes what decoding computes, up to float rounding; speculative "
            "decoding gives this target's own output here. Rounding-sized gaps can still flip a greedy "
            "choice at an exact near-tie between two tokens."
        )
    else:
        lines.append(
            "NOT EXACT: the verify pass computes different logits than one-by-one decoding (for example a "
            "quantized matmul kernel for several rows that sums in another order), so speculative output "
            "can differ from plain decoding with this model on this machine. Decode without the drafter "
            "(--no-draft), or try another dtype or quantization."
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_pair_options(parser, no_draft=False)
    parser.add_argument("--num-draft-tokens", type=int, default=None,
                        help="k, tokens drafted per round (default: the drafter's own)")
    parser.add_argument("--max-tokens", type=int, default=DOCTOR_MAX_TOKENS,
                        help="tokens generated per prompt")


def run(args: argparse.Namespace) -> None:
    """`gemma-mtp doctor`: run the check on a few prompts, print what it means; an error
    (exit status 1) when speculative output is not exact."""
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.num_draft_tokens is not None and args.num_draft_tokens < 1:
        raise ValueError(f"--num-draft-tokens must be at least 1, got {args.num_draft_tokens}")
    model, tokenizer, drafter = load(args.model, args.draft_model)
    if drafter is None:
        raise ValueError(f"{args.model} has no drafter: pass --draft-model (its gemma4_assistant checkpoint)")
    k = args.num_draft_tokens or drafter.default_num_draft_tokens
    if args.model is None:  # the default pair's held-out code prompts
        lines = DEFAULT_PROMPTS_FILE.read_text().splitlines()
        texts = [json.loads(line) for line in lines if line.strip()][:DOCTOR_PROMPTS]
    else:
        texts = BUILT_IN_PROMPTS
    name = args.model or f"(default) {DEFAULT_MODEL.name}"
    print(f"exactness self-check: {name}", flush=True)
    check = exactness_check(model, tokenizer, drafter, [chat_prompt(tokenizer, t) for t in texts],
                            num_draft_tokens=k, max_tokens=args.max_tokens)
    print(describe(check))
    if not check["ok"]:
        print("gemma-mtp doctor: speculative decoding is not exact for this pair here", file=sys.stderr)
        sys.exit(1)
