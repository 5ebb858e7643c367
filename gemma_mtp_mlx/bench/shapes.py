"""`gemma-mtp bench --shapes`: what speculation costs at the published sizes, on this machine.

The default pair is a toy; this builds random-weight drafters and target slices at the
shapes of Google's published pairs (DESIGN.md 6) and times them: the compiled drafter
step, and for every kind of target layer (sliding or full attention, computing or sharing
K/V) one layer's decode and (k + 1)-token verify, reading `context` cached positions. The
target step is the sum over its layers plus its LM head. From these come c (drafter step /
target decode step), v(k) (verify / decode) and the speedup they predict at an assumed
per-position acceptance rate. Float32, bfloat16 and 4-bit (bfloat16 with 4-bit weights).

Memory stays near the largest single layer: one layer is built at a time, and the
vocabulary-sized tied heads (262,144 x hidden) are timed on 1/`head_split` of their rows
and scaled (a head's matmul cost is linear in its rows). Centroid heads keep their whole
vocabulary: they gather only the top centroids' rows.
"""

import json
import statistics
import time
from pathlib import Path
from dataclasses import asdict, dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models import gemma4_text
from mlx_lm.models.cache import KVCache

from ..drafter import Drafter, DrafterArgs

DTYPES = ("float32", "bfloat16", "4-bit")
ASSUMED_ACCEPTANCE = 0.7  # per draft position, for the predicted speedup
WARMUP = 1


@dataclass(frozen=True)
class PairShape:
    """A target and its assistant at published sizes. `assumed` names the values that are
    estimates (from parameter counts), not published configuration."""

    name: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    global_kv_heads: Optional[int]
    sliding_window: int
    kv_shared: int
    k_eq_v: bool
    full_every: int  # every full_every-th layer is full attention
    drafter_heads: int
    drafter_intermediate: int
    centroid_head: bool
    per_layer_input: int = 0
    moe: Optional[Tuple[int, int, int]] = None  # (experts, top-k, expert intermediate)
    drafter_hidden: int = 1024
    vocab: int = 262144
    head_dim: int = 256
    global_head_dim: int = 512
    assumed: str = ""


PUBLISHED = (
    PairShape("E2B", 1536, 35, 6144, 8, 1, None, 512, 20, False, 5, 4, 2048, True, per_layer_input=256,
              drafter_hidden=256, assumed="drafter heads and MLP width (from its ~78M parameters)"),
    PairShape("E4B", 2560, 42, 10240, 8, 2, None, 512, 18, False, 6, 4, 2048, True, per_layer_input=256,
              drafter_hidden=256, assumed="drafter heads and MLP width (from its ~79M parameters)"),
    PairShape("12B", 3840, 48, 15360, 16, 8, 1, 1024, 0, True, 6, 16, 8192, False,
              assumed="target MLP width (Gemma 3 12B's), drafter MLP width"),
    PairShape("26B-A4B", 2816, 30, 2112, 16, 8, 2, 1024, 0, True, 6, 16, 8192, False, moe=(128, 8, 704),
              assumed="drafter heads and MLP width (from its ~420M parameters)"),
    PairShape("31B", 5376, 60, 21504, 32, 16, 4, 1024, 0, True, 6, 32, 8192, False,
              assumed="drafter MLP width (from its ~470M parameters)"),
)

# Tiny stand-ins with the same structure, for tests.
SMALL = (
    replace(PUBLISHED[0], name="E2B-small", hidden=128, layers=5, intermediate=256, vocab=4096, sliding_window=16,
            kv_shared=2, per_layer_input=64, drafter_hidden=64, drafter_intermediate=128, head_dim=64,
            global_head_dim=128),
    replace(PUBLISHED[3], name="26B-A4B-small", hidden=128, layers=6, intermediate=256, vocab=4096,
            sliding_window=16, moe=(8, 2, 64), drafter_hidden=64, drafter_intermediate=128, head_dim=64,
            global_head_dim=128),
)
SHAPE_SETS = {"published": PUBLISHED, "small": SMALL}


def layer_types(shape: PairShape) -> List[str]:
    return ["full_attention" if (i + 1) % shape.full_every == 0 else "sliding_attention" for i in range(shape.layers)]


def target_args(shape: PairShape) -> gemma4_text.ModelArgs:
    experts, top_k, expert_width = shape.moe or (None, None, None)
    return gemma4_text.ModelArgs(
        hidden_size=shape.hidden, num_hidden_layers=shape.layers, intermediate_size=shape.intermediate,
        num_attention_heads=shape.heads, head_dim=shape.head_dim, global_head_dim=shape.global_head_dim,
        num_key_value_heads=shape.kv_heads, num_global_key_value_heads=shape.global_kv_heads,
        num_kv_shared_layers=shape.kv_shared, hidden_size_per_layer_input=shape.per_layer_input,
        vocab_size=shape.vocab, vocab_size_per_layer_input=shape.vocab, sliding_window=shape.sliding_window,
        attention_k_eq_v=shape.k_eq_v, use_double_wide_mlp=shape.per_layer_input > 0,
        enable_moe_block=shape.moe is not None, num_experts=experts, top_k_experts=top_k,
        moe_intermediate_size=expert_width, layer_types=layer_types(shape),
    )


def drafter_args(shape: PairShape, vocab: int) -> DrafterArgs:
    text = gemma4_text.ModelArgs(
        hidden_size=shape.drafter_hidden, num_hidden_layers=4, intermediate_size=shape.drafter_intermediate,
        num_attention_heads=shape.drafter_heads, head_dim=shape.head_dim, global_head_dim=shape.global_head_dim,
        num_key_value_heads=shape.kv_heads, num_global_key_value_heads=shape.global_kv_heads,
        num_kv_shared_layers=4, hidden_size_per_layer_input=0, vocab_size=vocab,
        attention_k_eq_v=shape.k_eq_v, use_double_wide_mlp=False, final_logit_softcapping=None,
        layer_types=["sliding_attention"] * 3 + ["full_attention"], sliding_window=shape.sliding_window,
    )
    centroids = min(2048, vocab // 128)
    return DrafterArgs(text=text, backbone_hidden_size=shape.hidden, use_ordered_embeddings=shape.centroid_head,
                       num_centroids=centroids, centroid_intermediate_top_k=min(32, centroids))


def cast(module: nn.Module, dtype: str) -> nn.Module:
    """float32, bfloat16, or bfloat16 with 4-bit weights (centroids kept, as convert does)."""
    if dtype != "float32":
        module.set_dtype(mx.bfloat16)
    if dtype == "4-bit":
        nn.quantize(module, group_size=64, bits=4,
                    class_predicate=lambda path, m: hasattr(m, "to_quantized") and not path.endswith("centroids"))
    mx.eval(module.parameters())
    return module


def median_ms(step: Callable[[], None], iters: int) -> float:
    times = []
    for i in range(WARMUP + iters):
        tic = time.perf_counter()
        step()
        if i >= WARMUP:
            times.append(time.perf_counter() - tic)
    return statistics.median(times) * 1e3


def random_kv(heads: int, length: int, dim: int, dtype) -> Tuple[mx.array, mx.array]:
    keys = mx.random.normal((1, heads, length, dim)).astype(dtype)  # [1, kv_heads, S, D]
    return keys, mx.random.normal((1, heads, length, dim)).astype(dtype)


def time_layer(args, index: int, dtype: str, context: int, ks: Sequence[int], iters: int) -> Dict[str, float]:
    """One target layer's decode (L = 1) and verify (L = k + 1) ms, reading `context`
    cached positions (a sliding layer: its window)."""
    layer = cast(gemma4_text.DecoderLayer(args, index), dtype)
    act = mx.float32 if dtype == "float32" else mx.bfloat16
    attn = layer.self_attn
    cached = context if attn.layer_type == "full_attention" else min(context, args.sliding_window)
    cache, shared = None, None
    if attn.has_kv:
        cache = KVCache()
        cache.update_and_fetch(*random_kv(attn.n_kv_heads, cached, attn.head_dim, act))
    else:
        shared = random_kv(attn.n_kv_heads, cached + max(ks) + 1, attn.head_dim, act)

    def forward(length: int) -> Callable[[], None]:
        x = mx.random.normal((1, length, args.hidden_size)).astype(act)
        per_layer = mx.random.normal((1, length, args.hidden_size_per_layer_input)).astype(act) \
            if args.hidden_size_per_layer_input else None
        mask = None if length == 1 else mx.tri(length, cached + length, k=cached, dtype=mx.bool_)
        kv = None if shared is None else tuple(a[..., : cached + length, :] for a in shared)

        def step():
            mx.eval(layer(x, mask, cache, per_layer_input=per_layer, shared_kv=kv, offset=cached)[0])
            if cache is not None:
                cache.trim(length)
        return step

    out = {"decode_ms": median_ms(forward(1), iters)}
    out["verify_ms"] = {str(k): median_ms(forward(k + 1), iters) for k in ks}
    return out


def time_head(vocab_rows: int, hidden: int, dtype: str, lengths: Sequence[int], iters: int) -> Dict[int, float]:
    """ms of a tied LM head over `vocab_rows` rows for inputs of each length."""
    head = cast(nn.Embedding(vocab_rows, hidden), dtype)
    act = mx.float32 if dtype == "float32" else mx.bfloat16
    out = {}
    for length in lengths:
        x = mx.random.normal((1, length, hidden)).astype(act)
        out[length] = median_ms(lambda: mx.eval(head.as_linear(x)), iters)
    return out


def time_drafter(shape: PairShape, dtype: str, context: int, head_split: int, iters: int) -> Dict[str, float]:
    """The compiled greedy drafter step, reading `context` full-attention and a window of
    sliding K/V positions. A dense head is built on 1/head_split of the vocabulary and the
    rest of its cost added from `time_head`."""
    vocab = shape.vocab if shape.centroid_head else shape.vocab // head_split
    drafter = cast(Drafter(drafter_args(shape, vocab)), dtype)
    if shape.centroid_head:  # a random permutation: each centroid owns a block of tokens
        drafter.masked_embedding.token_ordering = mx.random.permutation(vocab).astype(mx.int32)
    act = mx.float32 if dtype == "float32" else mx.bfloat16
    target_rows = shape.vocab // head_split
    target_embed = cast(nn.Embedding(target_rows, shape.hidden), dtype)
    embed = lambda tokens: target_embed(tokens % target_rows)  # noqa: E731 (drafted ids span the vocab)
    text = drafter.args.text
    kv = {
        "full_attention": random_kv(shape.global_kv_heads or shape.kv_heads, context, shape.global_head_dim, act),
        "sliding_attention": random_kv(shape.kv_heads, min(context, shape.sliding_window) + 1, shape.head_dim, act),
    }
    token = mx.array([1], dtype=mx.uint32)
    hidden = mx.random.normal((1, 1, shape.hidden)).astype(act)
    mx.eval(token, hidden, kv)
    step_ms = median_ms(lambda: mx.eval(drafter.draft(embed, token, hidden, context, kv, 1)[0]), iters)
    params = sum(v.size for _, v in tree_flatten(drafter.parameters()))
    if not shape.centroid_head:  # the rest of the dense head
        step_ms += (head_split - 1) * time_head(vocab, text.hidden_size, dtype, [1], iters)[1]
        params += (head_split - 1) * vocab * text.hidden_size
    return dict(step_ms=step_ms, stored_parameters=params)


def time_target(shape: PairShape, dtype: str, context: int, ks: Sequence[int], head_split: int,
                iters: int) -> dict:
    """Every kind of target layer timed once, the step summed over the layers, plus the head."""
    args = target_args(shape)
    kinds: Dict[Tuple[str, bool], List[int]] = {}
    for i, kind in enumerate(args.layer_types):
        kinds.setdefault((kind, i >= shape.layers - shape.kv_shared), []).append(i)
    layers = []
    for (kind, shares_kv), indices in kinds.items():
        timing = time_layer(args, indices[0], dtype, context, ks, iters)
        layers.append(dict(kind=kind, shares_kv=shares_kv, count=len(indices), **timing))
        mx.clear_cache()
    head = time_head(shape.vocab // head_split, shape.hidden, dtype, [1] + [k + 1 for k in ks], iters)
    decode = sum(l["count"] * l["decode_ms"] for l in layers) + head_split * head[1]
    verify = {str(k): sum(l["count"] * l["verify_ms"][str(k)] for l in layers) + head_split * head[k + 1]
              for k in ks}
    return dict(layers=layers, head_decode_ms=head_split * head[1], decode_ms=decode, verify_ms=verify)


def measure_pair(shape: PairShape, dtype: str, *, context: int, ks: Sequence[int], head_split: int,
                 iters: int) -> dict:
    """One row of the table: step costs, c, v(k), predicted speedup per k."""
    row = dict(pair=shape.name, dtype=dtype, error=None)
    try:
        drafter = time_drafter(shape, dtype, context, head_split, iters)
        mx.clear_cache()
        target = time_target(shape, dtype, context, ks, head_split, iters)
    except (RuntimeError, ValueError) as e:  # e.g. MLX's CPU MoE matmul is float32 only
        return dict(row, error=str(e).splitlines()[0])
    finally:
        mx.clear_cache()
    c = drafter["step_ms"] / target["decode_ms"]
    v = {k: t / target["decode_ms"] for k, t in target["verify_ms"].items()}
    accepted = {str(k): sum(ASSUMED_ACCEPTANCE ** i for i in range(k + 1)) for k in ks}
    speedup = {str(k): accepted[str(k)] / (v[str(k)] + k * c) for k in ks}
    best = max(speedup, key=speedup.get)
    return dict(row, drafter=drafter, target=target, c=c, v=v, mean_accepted_length=accepted,
                predicted_speedup=speedup, best_k=int(best))


def run_shapes(which: str = "published", *, dtypes: Sequence[str] = DTYPES, context: int = 1024,
               ks: Sequence[int] = (1, 2, 3, 4), head_split: int = 8, iters: int = 3,
               progress: Optional[Callable[[str], None]] = None) -> dict:
    """The cost table for every pair of `SHAPE_SETS[which]` in every dtype."""
    report = progress or (lambda line: None)
    rows = []
    for dtype in dtypes:  # a whole dtype first: the float32 table is the one a CPU run needs most
        for shape in SHAPE_SETS[which]:
            rows.append(measure_pair(shape, dtype, context=context, ks=ks, head_split=head_split, iters=iters))
            report(f"shapes: {describe_row(rows[-1])}")
    return dict(shapes=which, settings=dict(dtypes=list(dtypes), context=context, ks=list(ks), head_split=head_split,
                                            iters=iters, assumed_acceptance=ASSUMED_ACCEPTANCE),
                pairs=[dict(asdict(s), moe=s.moe and list(s.moe)) for s in SHAPE_SETS[which]], rows=rows)


def describe_row(row: dict) -> str:
    if row["error"]:
        return f"{row['pair']} {row['dtype']}: {row['error']}"
    speedup = ", ".join(f"k={k} {x:.2f}" for k, x in row["predicted_speedup"].items())
    return (f"{row['pair']} {row['dtype']}: drafter step {row['drafter']['step_ms']:.2f} ms, target decode "
            f"{row['target']['decode_ms']:.1f} ms, c = {row['c']:.3f}, v = "
            + ", ".join(f"{v:.2f}" for v in row["v"].values()) + f"; predicted speedup {speedup}")


def write_reports(result: dict, out_dir) -> Tuple[Path, Path]:
    """`shapes.json` (everything) and `shapes.md` (the table) in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "shapes.json", out / "shapes.md"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md_path.write_text(markdown_table(result) + "\n")
    return json_path, md_path


def markdown_table(result: dict) -> str:
    ks = result["settings"]["ks"]
    lines = [
        "| pair | dtype | drafter step ms | target decode ms | c | " + " | ".join(f"v({k})" for k in ks)
        + " | " + " | ".join(f"speedup k={k}" for k in ks) + " |",
        "|---|---|" + "---:|" * (3 + 2 * len(ks)),
    ]
    for r in result["rows"]:
        if r["error"]:
            lines.append(f"| {r['pair']} | {r['dtype']} | {r['error']} |")
            continue
        lines.append(
            f"| {r['pair']} | {r['dtype']} | {r['drafter']['step_ms']:.2f} | {r['target']['decode_ms']:.1f} "
            f"| {r['c']:.3f} | " + " | ".join(f"{r['v'][str(k)]:.2f}" for k in ks) + " | "
            + " | ".join(f"{r['predicted_speedup'][str(k)]:.2f}" for k in ks) + " |"
        )
    return "\n".join(lines)
