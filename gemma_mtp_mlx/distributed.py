"""Tensor parallelism over `mlx.distributed`: a Gemma 4 target and its drafter split across ranks.

Launch with `mlx.launch` (ring backend between Macs over Thunderbolt or Ethernet, JACCL
over Thunderbolt 5, or `-n 2` on one host for testing). Every rank runs the same
speculative round on the same tokens; collectives inside the layers keep the ranks'
activations identical, so they draft, verify and accept identically.

How each piece is split over N ranks (mlx's sharded linear layers):
- attention: query heads split evenly (`q_proj` all-to-sharded, `o_proj` sharded-to-all:
  one all-reduce per layer). K/V heads split evenly when N divides them; when N is a
  multiple of their count (the E2B's single K/V head, the 31B's 4 global heads at N = 8)
  each rank keeps the one K/V head its query heads read. KV-shared layers read their
  producer's rank-local K/V, which holds exactly the heads their local queries need.
- MLP: gate/up columns split, down rows split (one all-reduce per layer).
- MoE (26B-A4B): every expert's intermediate width split like the MLP, so each rank holds
  1/N of every expert and routing (replicated, from identical activations) needs no
  traffic; splitting whole experts instead would leave ranks idle when a token's top-8
  experts sit on one rank.
- embeddings, norms, per-layer-input projections, the LM head: replicated, as in
  mlx-lm's other sharded models.
- drafter: its query heads split like the target's (each rank attends to its own slice of
  the target's K/V, so no K/V crosses the wire: one all-reduce per drafter layer); its MLPs,
  the pre/post projections and the centroid head are small and replicated, because a
  draft step is latency-bound and each all-reduce costs a round trip between the Macs.
"""

import json
import os
import signal
import sys
import threading
from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace, shard_linear

from .adaptive import AUTO
from .drafter import Drafter
from .speculative import GENERATION_STREAM
from .target import Target


def world() -> mx.distributed.Group:
    """This process's group: size 1 unless started by `mlx.launch`."""
    return mx.distributed.init()


def is_rank_zero() -> bool:
    """Whether this process prints and writes reports: rank 0 of a launch, or a lone process."""
    return world().rank() == 0


def rank_label() -> str:
    """The rank, as " (rank r)", in a run over several ranks, for messages; else ""."""
    group = world()
    return f" (rank {group.rank()})" if group.size() > 1 else ""


def _kv_split(num_kv_heads: int, num_heads: int, N: int, rank: int, what: str) -> Tuple[int, int]:
    """(first K/V head, K/V heads) this rank keeps for `num_kv_heads` heads over N ranks."""
    if num_heads % N:
        raise ValueError(
            f"cannot split {what}: {num_heads} query heads do not divide over {N} ranks; "
            f"use a number of ranks that divides {num_heads}"
        )
    if num_kv_heads % N == 0:
        return rank * num_kv_heads // N, num_kv_heads // N
    if N % num_kv_heads == 0:
        return rank * num_kv_heads // N, 1
    raise ValueError(
        f"cannot split {what}: {num_kv_heads} key/value heads over {N} ranks (N must divide "
        f"them or be a multiple of them); use {num_kv_heads} ranks or a divisor of it"
    )


def _keep_rows(linear: nn.Module, start: int, stop: int) -> None:
    """Keep output rows [start, stop) of a (possibly quantized) linear layer."""
    linear.update({name: linear[name][start:stop] for name in ("weight", "scales", "biases")
                   if name in linear})


def _check_width(width: int, N: int, what: str) -> None:
    if width % N:
        raise ValueError(f"cannot split {what} of width {width} over {N} ranks; use a divisor of {width}")


def _shard_mlp(mlp: nn.Module, group, what: str) -> None:
    _check_width(mlp.gate_proj.weight.shape[0], group.size(), what)
    mlp.gate_proj = shard_linear(mlp.gate_proj, "all-to-sharded", group=group)
    mlp.up_proj = shard_linear(mlp.up_proj, "all-to-sharded", group=group)
    mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=group)


def _shard_attention(attn: nn.Module, group, what: str) -> None:
    N, rank = group.size(), group.rank()
    first, count = _kv_split(attn.n_kv_heads, attn.n_heads, N, rank, what)
    attn.q_proj = shard_linear(attn.q_proj, "all-to-sharded", group=group)
    attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
    attn.n_heads //= N
    if attn.has_kv:
        for name in ("k_proj", "v_proj"):
            if name in attn:
                _keep_rows(attn[name], first * attn.head_dim, (first + count) * attn.head_dim)
        attn.n_kv_heads = count


class ShardedExperts(nn.Module):
    """mlx-lm's Gemma 4 experts with every expert's intermediate width split over ranks:
    each rank computes a partial sum of every chosen expert's output; one all-reduce."""

    def __init__(self, experts: nn.Module, group):
        super().__init__()
        self.experts = experts
        self.group = group
        glu = experts.switch_glu
        shard_inplace(glu.gate_proj, "all-to-sharded", group=group)
        shard_inplace(glu.up_proj, "all-to-sharded", group=group)
        shard_inplace(glu.down_proj, "sharded-to-all", group=group)

    def __call__(self, x, top_k_indices, top_k_weights):
        return mx.distributed.all_sum(self.experts(x, top_k_indices, top_k_weights), group=self.group)


def shard_target(target: Target, group) -> None:
    """Split `target`'s layers over `group` in place (see the module docstring)."""
    N = group.size()
    if N == 1:
        return
    for layer in target.backbone.layers:
        what = f"target layer {layer.layer_idx} ({layer.layer_type})"
        _shard_attention(layer.self_attn, group, what)
        _shard_mlp(layer.mlp, group, f"{what} MLP")
        if layer.enable_moe:
            _check_width(target.args.moe_intermediate_size, N, f"{what} experts")
            layer.experts = ShardedExperts(layer.experts, group)


def shard_drafter(drafter: Drafter, target: Target, group) -> None:
    """Split the drafter's query heads over `group` like `target`'s (call before
    `shard_target`, which changes the target's head counts)."""
    if group.size() == 1:
        return
    target_kv_heads = {
        layer.layer_type: layer.self_attn.n_kv_heads for layer in target.backbone.layers
    }
    for i, layer in enumerate(drafter.model.layers):
        what = f"drafter layer {i} ({layer.layer_type})"
        # Its queries read the target's rank-local K/V: split them over the same heads.
        layer.self_attn.n_kv_heads = target_kv_heads[layer.layer_type]
        _shard_attention(layer.self_attn, group, what)


def load_sharded(path_or_repo=None, draft_model=None, *, no_draft: bool = False, group=None):
    """`load()` split over `group` (whole on a group of one): (model, tokenizer, drafter or None).

    The target is loaded lazily and split before its weights are read, so each rank
    materialises only its own slice of the split layers (plus the replicated ones).
    """
    from .loading import load

    group = group or world()
    target, tokenizer, drafter = load(path_or_repo, None if no_draft else draft_model, lazy=True)
    if no_draft:
        drafter = None  # a converted pair's own drafter, never read
    if drafter is not None:
        shard_drafter(drafter, target, group)
        mx.eval(drafter.parameters())
    shard_target(target, group)
    mx.eval(target.model.parameters())
    return target, tokenizer, drafter


def load_pair(path_or_repo=None, draft_model=None, *, no_draft: bool = False):
    """(model, tokenizer, drafter or None) for a command, on the main thread: split over the
    ranks under `mlx.launch`, with only rank 0 printing and every rank ending when another
    one dies; whole in a lone process."""
    group = world()
    if group.size() > 1:
        quiet_other_ranks(group)
        exit_when_terminated(group)
    return load_sharded(path_or_repo, draft_model, no_draft=no_draft, group=group)


def refuse_adaptive_k(draft_lengths, option: str) -> None:
    """Every rank must draft the same k each round, and `auto` picks k from the round times
    this rank measures, which differ between ranks: refuse it under a launch."""
    if world().size() > 1 and AUTO in draft_lengths:
        raise ValueError(f"{option} {AUTO} picks k from each rank's own round times, which differ between "
                         f"ranks: give a fixed draft length under mlx.launch")


def broadcast_json(message, group):
    """Rank 0's `message` (a JSON value, or None for nothing; ignored on other ranks) on every
    rank, through two all-reduces: its length, then its UTF-8 bytes. None costs one.

    The model's own all-reduces run on the generation stream, and a batch engine's step
    leaves its next round in flight there: this waits for them first, or the two streams'
    collectives could meet the other ranks in another order (garbled bytes, a hang)."""
    mx.synchronize(GENERATION_STREAM)
    data = json.dumps(message).encode() if group.rank() == 0 and message is not None else b""
    length = int(mx.distributed.all_sum(mx.array(len(data)), group=group, stream=mx.cpu).item())
    if length == 0:
        return None
    mine = mx.array(list(data), dtype=mx.uint8) if data else mx.zeros(length, dtype=mx.uint8)
    received = mx.distributed.all_sum(mine, group=group, stream=mx.cpu)
    return json.loads(bytes(received.tolist()).decode())


def random_seed() -> int:
    """A fresh sampling seed, for a run or request that gave none."""
    return int.from_bytes(os.urandom(3), "little")


def shared_seed(seed: Optional[int], group) -> Optional[int]:
    """The same sampling seed on every rank: `seed`, or one drawn on rank 0 and sent to all."""
    if group.size() == 1 or seed is not None:
        return seed
    mine = random_seed() if group.rank() == 0 else 0
    return int(mx.distributed.all_sum(mx.array(mine), group=group).item())


def quiet_other_ranks(group) -> None:
    """Only rank 0 prints: the other ranks' stdout and stderr go to /dev/null (their errors
    still reach the terminal through `sys.__stderr__`)."""
    global _QUIETED
    if group.rank() != 0:
        sys.stdout = open(os.devnull, "w")
        sys.stderr = sys.stdout
        _QUIETED = True


_QUIETED = False  # this rank's stdout and stderr go to /dev/null


def error_stream():
    """Where this process writes its one-line errors: stderr, even on a quieted rank."""
    return sys.__stderr__ if _QUIETED else sys.stderr


def exit_when_terminated(group) -> None:
    """Print one clear line and exit when the launcher ends this rank.

    `mlx.launch` terminates the remaining ranks (SIGTERM) when one exits. A rank is then
    usually blocked inside an all-reduce, where a Python signal handler would never run,
    so a thread woken through the signal's wakeup fd reports and exits instead.
    """
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)  # replaced by the thread's exit
    signal.set_wakeup_fd(write_fd)

    def report():
        while os.read(read_fd, 1)[0] != signal.SIGTERM:  # the fd carries every handled signal
            pass
        message = (f"gemma-mtp (rank {group.rank()}): stopped: another rank of this run exited, "
                   "so the launcher ended this one; its error is above\n")
        os.write(sys.__stderr__.fileno(), message.encode())
        os._exit(1)

    threading.Thread(target=report, daemon=True, name="rank-watchdog").start()
