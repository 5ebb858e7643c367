"""Train an MTP drafter for a frozen target on MLX: `gemma-mtp train-drafter`.

MTP drafters learn from the frozen target: its final-norm hidden state at P - 1, its
producer layers' K/V for positions < P and the token at P. One training sequence of T
tokens gives T - 1 drafting positions P = 1..T-1, all computed in parallel with the
drafter's own masks (strict causal; sliding layers see the last `window + 1` positions,
the assistant's inclusive window). The drafter is unrolled `draft_steps` times at the same
position P: step j reads the token at P + j and the previous step's projected state, and
is taught the target's next-token distribution at P + j (soft cross-entropy, equal to the
KL divergence up to the teacher's entropy) and, with a centroid head, the target's
probability mass per centroid.

The output is written in Google's Hugging Face layout (config.json, model.safetensors,
generation_config.json) plus training.json, into a temporary directory renamed into place.
"""

import argparse
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from tqdm import tqdm
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.models.cache import KVCache
from mlx_lm.models.gemma4_text import logit_softcap

from . import data
from ..checkpoint import CheckpointError, published_text_config, quantization, read_config, resolve_path
from ..convert import _move_into_place
from ..drafter import Drafter, DrafterArgs, check_pair, load_drafter
from ..generate import stream_generate
from ..target import Target, load_target

FULL, SLIDING = "full_attention", "sliding_attention"


# ---------------------------------------------------------------------------
# The teacher and the parallel drafter forward


@dataclass
class Teacher:
    """What the frozen target gives one batch of sequences [B, T]."""

    embeds: mx.array  # [B, T, backbone] the target's scaled token embeddings
    hidden: mx.array  # [B, T, backbone] final-norm hidden states
    probs: mx.array  # [B, T, vocab] next-token distributions
    kv: Dict[str, Tuple[mx.array, mx.array]]  # producer K/V per layer type, [B, kv_heads, T, head_dim]


def teacher(target: Target, tokens: mx.array) -> Teacher:
    """Run the frozen target over `tokens` [B, T] (float32 outputs, no gradients)."""
    args = target.args
    cache = [KVCache() for _ in range(args.num_hidden_layers - args.num_kv_shared_layers)]
    logits, hidden = target(tokens, cache)
    kv = {
        t: (cache[i].keys[..., : cache[i].offset, :], cache[i].values[..., : cache[i].offset, :])
        for t, i in target.producers.items()
    }

    def fixed(a: mx.array) -> mx.array:
        return mx.stop_gradient(a.astype(mx.float32))

    return Teacher(
        embeds=fixed(target.embed(tokens)),
        hidden=fixed(hidden),
        probs=mx.softmax(fixed(logits), axis=-1),
        kv={t: (fixed(k), fixed(v)) for t, (k, v) in kv.items()},
    )


def drafter_masks(length: int, window: int) -> Dict[str, mx.array]:
    """Masks [length - 1, length]: query i drafts at P = i + 1 and sees the target's K/V at
    positions < P; sliding layers only the last window + 1 of them."""
    positions = mx.arange(1, length)[:, None]
    keys = mx.arange(length)[None]
    full = keys < positions
    return {FULL: full, SLIDING: full & (keys >= positions - window - 1)}


def unrolled_states(drafter: Drafter, t: Teacher, draft_steps: int) -> List[mx.array]:
    """The drafter's final-norm states of each unrolled step at every position at once.

    Step j returns [B, T - 1 - j, H]: row i drafts at P = i + 1 from the token at P + j.
    """
    T = t.hidden.shape[1]
    masks = drafter_masks(T, drafter.args.text.sliding_window)
    state = t.hidden[:, :-1]  # h at P - 1 for P = 1..T-1
    states = []
    for j in range(draft_steps):
        length = T - 1 - j
        x = drafter.pre_projection(mx.concatenate([t.embeds[:, 1 + j :], state[:, :length]], axis=-1))
        for layer in drafter.model.layers:
            # offset 1: query i sits at position i + 1 (RoPE)
            x, _, _ = layer(x, mask=masks[layer.layer_type][:length], shared_kv=t.kv[layer.layer_type], offset=1)
        h = drafter.model.norm(x)
        states.append(h)
        state = drafter.post_projection(h)
    return states


def dense_logits(drafter: Drafter, h: mx.array) -> mx.array:
    """Full-vocabulary logits [..., vocab] of the tied embedding (every token scored)."""
    logits = drafter.model.embed_tokens.as_linear(h)
    cap = drafter.args.text.final_logit_softcapping
    return logits if cap is None else logit_softcap(cap, logits)


def centroid_mass(probs: mx.array, head) -> mx.array:
    """The probability of each centroid's block of tokens: [..., vocab] -> [..., num_centroids]."""
    ordered = mx.take(probs, head.token_ordering, axis=-1)
    return ordered.reshape(*probs.shape[:-1], head.num_centroids, head.per_centroid).sum(-1)


def soft_cross_entropy(logits: mx.array, target_probs: mx.array) -> mx.array:
    """Mean over rows of -sum(p * log softmax(logits))."""
    log_q = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return -(target_probs * log_q).sum(-1).mean()


def drafter_loss(drafter: Drafter, t: Teacher, draft_steps: int, centroid_weight: float = 1.0) -> mx.array:
    """Mean over unrolled steps of the token loss (+ weighted centroid loss)."""
    total = mx.array(0.0)
    for j, h in enumerate(unrolled_states(drafter, t, draft_steps)):
        p = t.probs[:, 1 + j :]  # the target's distribution at P + j
        total = total + soft_cross_entropy(dense_logits(drafter, h), p)
        if drafter.args.use_ordered_embeddings:
            head = drafter.masked_embedding
            total = total + centroid_weight * soft_cross_entropy(head.centroids(h), centroid_mass(p, head))
    return total / draft_steps


# ---------------------------------------------------------------------------
# Settings


@dataclass
class Settings:
    """Everything `train-drafter` takes; recorded in training.json."""

    model: str
    out: str
    data: List[str] = field(default_factory=list)
    draft_model: Optional[str] = None
    adapter_path: Optional[str] = None
    eval_data: List[str] = field(default_factory=list)
    self_generate: int = 0
    self_generate_temp: float = 1.0
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 256
    draft_steps: int = 4
    learning_rate: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    grad_clip: float = 1.0
    centroid_loss_weight: float = 1.0
    seed: int = 0
    # a fresh drafter (no draft_model)
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: Optional[int] = None  # 4 x hidden_size
    num_centroids: int = 0  # 0: dense head
    centroid_top_k: int = 32
    num_assistant_tokens: Optional[int] = None  # unset: draft_steps
    # evaluation and checkpoints
    eval_every: int = 100
    eval_prompts: int = 8
    eval_prompt_tokens: int = 64
    eval_max_tokens: int = 64
    eval_draft_tokens: int = 4
    checkpoint_every: int = 100
    resume: bool = False

    # settings that may change when resuming
    RESUMABLE = ("resume", "checkpoint_every", "eval_every")

    def check(self) -> None:
        positive = ("steps", "batch_size", "seq_len", "draft_steps", "hidden_size", "num_layers", "num_heads",
                    "eval_prompt_tokens", "eval_max_tokens", "eval_draft_tokens")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("self_generate", "eval_every", "eval_prompts", "checkpoint_every", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning-rate must be > 0, got {self.learning_rate}")
        if not self.data and not self.self_generate:
            raise ValueError("no training data: give --data PATH... (text files, directories, JSONL) "
                             "or --self-generate N to let the target write its own")

    @property
    def checkpoint_dir(self) -> Path:
        out = Path(self.out).expanduser().absolute()
        return out.with_name(out.name + ".checkpoint")


def learning_rate_schedule(s: Settings):
    """Linear warm-up to the peak, then cosine decay to `min_lr_ratio` of it."""
    peak, warmup, floor = s.learning_rate, s.warmup_steps, s.min_lr_ratio
    span = max(1, s.steps - warmup)

    def schedule(step: mx.array) -> mx.array:  # step: updates done so far
        step = step.astype(mx.float32)
        warm = peak * (step + 1) / max(1, warmup)
        cosine = peak * (floor + (1 - floor) * 0.5 * (1 + mx.cos(math.pi * (step - warmup) / span)))
        return mx.where(step < warmup, warm, cosine)

    return schedule


# ---------------------------------------------------------------------------
# Models


def load_frozen_target(model: str, adapter_path: Optional[str]):
    """The target (with an mlx-lm adapter applied when given), frozen: (Target, tokenizer)."""
    target, tokenizer = load_target(resolve_path(model))
    if adapter_path:
        from mlx_lm.tuner.utils import load_adapters

        path = Path(adapter_path).expanduser()
        if not (path / "adapter_config.json").is_file():
            raise CheckpointError(f"{path} has no adapter_config.json: give the directory mlx_lm.lora wrote")
        load_adapters(target.model, str(path))
    target.model.freeze()
    target.model.eval()
    return target, tokenizer


def fresh_drafter_config(target: Target, s: Settings) -> Dict:
    """A gemma4_assistant config (published form) shaped for `target`."""
    t = target.args
    layer_types = [SLIDING] * (s.num_layers - 1) + [FULL]
    text = dict(
        model_type="gemma4_text", hidden_size=s.hidden_size, intermediate_size=s.intermediate_size or 4 * s.hidden_size,
        num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads, layer_types=layer_types,
        num_kv_shared_layers=s.num_layers, num_key_value_heads=t.num_key_value_heads,
        num_global_key_value_heads=t.num_global_key_value_heads, head_dim=t.head_dim,
        global_head_dim=t.global_head_dim, attention_k_eq_v=t.attention_k_eq_v, sliding_window=t.sliding_window,
        rope_parameters=t.rope_parameters, rms_norm_eps=t.rms_norm_eps, vocab_size=t.vocab_size,
        max_position_embeddings=t.max_position_embeddings, hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0, use_double_wide_mlp=False, enable_moe_block=False,
        final_logit_softcapping=None, tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh",
        pad_token_id=t.pad_token_id, dtype="float32",
    )
    if s.num_centroids and t.vocab_size % s.num_centroids:
        raise ValueError(f"--num-centroids {s.num_centroids} does not divide the vocabulary ({t.vocab_size})")
    if s.num_centroids * t.vocab_size > MAX_KMEANS_PAIRS:
        raise ValueError(f"a fresh centroid head over {t.vocab_size} tokens x {s.num_centroids} centroids is "
                         "too large for the k-means here: start from the published assistant (--draft-model)")
    return dict(
        architectures=["Gemma4AssistantForCausalLM"], model_type="gemma4_assistant",
        backbone_hidden_size=t.hidden_size, use_ordered_embeddings=bool(s.num_centroids),
        num_centroids=s.num_centroids or 2048, centroid_intermediate_top_k=s.centroid_top_k,
        tie_word_embeddings=True, dtype="float32", text_config=text,
    )


def balanced_kmeans(vectors: np.ndarray, clusters: int, iters: int, seed: int) -> np.ndarray:
    """Token ordering: ids grouped cluster by cluster, every cluster the same size."""
    count = len(vectors)
    per = count // clusters
    rng = np.random.default_rng(seed)
    x = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    centers = x[rng.choice(count, clusters, replace=False)]
    for _ in range(iters):
        assignment = balanced_assignment(x @ centers.T, per)
        for c in range(clusters):
            mean = x[assignment == c].mean(axis=0)
            centers[c] = mean / np.linalg.norm(mean)
    assignment = balanced_assignment(x @ centers.T, per)
    return np.concatenate([np.flatnonzero(assignment == c) for c in range(clusters)]).astype(np.int64)


def balanced_assignment(similarity: np.ndarray, per: int) -> np.ndarray:
    """Greedy: the most similar (token, cluster) pairs first, each cluster taking `per` tokens."""
    order = np.argsort(-similarity, axis=None, kind="stable")
    tokens, clusters = np.unravel_index(order, similarity.shape)
    assignment = np.full(similarity.shape[0], -1)
    filled = np.zeros(similarity.shape[1], dtype=np.int64)
    for token, cluster in zip(tokens, clusters):
        if assignment[token] < 0 and filled[cluster] < per:
            assignment[token] = cluster
            filled[cluster] += 1
    return assignment


KMEANS_ITERS = 25
MAX_KMEANS_PAIRS = 2**26  # tokens x centroids the balanced k-means sorts
INIT_STD = 0.02  # transformers' Gemma 4 initializer_range


def fresh_drafter(target: Target, config: Dict, seed: int) -> Drafter:
    """A new drafter: matrices ~ N(0, 0.02), norms 1; the embedding starts from the target's
    when the widths match; a centroid head groups tokens by balanced k-means of the target's
    embeddings."""
    drafter = Drafter(DrafterArgs.from_config(config))
    params = tree_flatten(drafter.parameters())
    keys = mx.random.split(mx.random.key(seed), len(params))
    new = []
    for key, (name, value) in zip(keys, params):
        if value.ndim >= 2:
            new.append((name, INIT_STD * mx.random.normal(value.shape, key=key)))
    drafter.load_weights(new, strict=False)
    table = target.backbone.embed_tokens(mx.arange(target.vocab_size)).astype(mx.float32)  # quantized too
    if table.shape == drafter.model.embed_tokens.weight.shape:
        drafter.model.embed_tokens.weight = table
    if drafter.args.use_ordered_embeddings:
        ordering = balanced_kmeans(np.array(table), drafter.args.num_centroids, KMEANS_ITERS, seed)
        drafter.masked_embedding.token_ordering = mx.array(ordering, dtype=mx.int32)
    mx.eval(drafter.parameters())
    return drafter


def initial_drafter(target: Target, tokenizer, s: Settings) -> Tuple[Drafter, Dict, Dict]:
    """(drafter in float32 and training mode, its config.json, its generation_config.json)."""
    if s.draft_model:
        path = resolve_path(s.draft_model)
        config = read_config(path)
        if quantization(config):
            raise CheckpointError(f"{path} is quantized and cannot be trained: start from the unquantized "
                                  "assistant (the one you converted from)")
        drafter = load_drafter(path)
        generation_file = path / "generation_config.json"
        generation = json.loads(generation_file.read_text()) if generation_file.is_file() else {}
        config["text_config"] = published_text_config(config.get("text_config") or {})
    else:
        config = fresh_drafter_config(target, s)
        drafter = fresh_drafter(target, config, s.seed)
        generation = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                      "pad_token_id": target.args.pad_token_id}
    check_pair(target, drafter)
    drafter.update(tree_map(lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a,
                            drafter.parameters()))
    config["dtype"] = config["text_config"]["dtype"] = "float32"
    generation["num_assistant_tokens"] = s.num_assistant_tokens or generation.get("num_assistant_tokens") \
        or s.draft_steps
    drafter.train()
    for layer in drafter.model.layers:
        layer.freeze(keys=["layer_scalar"], recurse=False)  # a buffer in transformers
    if drafter.args.use_ordered_embeddings:
        drafter.masked_embedding.freeze(keys=["token_ordering"], recurse=False)
    return drafter, config, generation


# ---------------------------------------------------------------------------
# Data, evaluation, checkpoints


@dataclass
class Corpus:
    stream: np.ndarray  # training tokens
    prompts: List[List[int]]  # held-out evaluation prompts
    bos: int
    record: Dict  # for training.json


def prepare_data(target: Target, tokenizer, s: Settings) -> Corpus:
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    documents = data.read_documents(s.data, tokenizer) if s.data else []
    if s.self_generate:
        documents = documents + data.self_generate(target, tokenizer, s.self_generate, s.seq_len, documents,
                                                   s.self_generate_temp, s.seed)
    stream = data.token_stream(documents, eos)
    eval_stream = data.token_stream(data.read_documents(s.eval_data, tokenizer), eos) if s.eval_data else None
    stream, eval_stream = data.split_eval(stream, eval_stream, s.eval_prompts, s.eval_prompt_tokens)
    data.check_long_enough(stream, s.seq_len, "training data")
    prompts = data.eval_prompts(eval_stream, s.eval_prompts, s.eval_prompt_tokens, bos) if s.eval_prompts else []
    record = dict(documents=len(documents), training_tokens=int(len(stream)), training_sha256=data.digest(stream),
                  eval_tokens=0 if eval_stream is None else int(len(eval_stream)),
                  eval_sha256=None if eval_stream is None else data.digest(eval_stream))
    return Corpus(stream, prompts, bos, record)


def mean_accepted_length(target: Target, tokenizer, drafter: Drafter, prompts: List[List[int]], s: Settings) -> float:
    """Greedy mean accepted length (accepted drafts per round + 1) through the real
    speculative loop, pooled over the prompts."""
    rounds = accepted = 0
    for prompt in prompts:
        for response in stream_generate(target, tokenizer, prompt, draft_model=drafter,
                                         max_tokens=s.eval_max_tokens, num_draft_tokens=s.eval_draft_tokens):
            pass
        rounds += response.stats.rounds
        accepted += response.stats.accepted_tokens
    return accepted / rounds + 1 if rounds else 1.0


@dataclass
class Progress:
    step: int = 0
    losses: List[float] = field(default_factory=list)
    evals: List[Dict] = field(default_factory=list)  # {"step", "mean_accepted_length"}
    seconds: float = 0.0  # training time, evaluation excluded


def identity(s: Settings, corpus: Corpus) -> Dict:
    """What a checkpoint must share with the run that resumes it."""
    settings = {k: v for k, v in asdict(s).items() if k not in Settings.RESUMABLE}
    return {"settings": settings, "data": corpus.record}


def _staging_dir(path: Path) -> Path:
    """A new directory beside `path` (readable like any directory the user makes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.writing-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    return staging


def save_checkpoint(directory: Path, drafter: Drafter, optimizer: optim.Optimizer, progress: Progress,
                    ident: Dict) -> None:
    """Weights, optimizer state and progress, replacing the previous checkpoint atomically."""
    staging = _staging_dir(directory)
    try:
        mx.save_safetensors(str(staging / "drafter.safetensors"), dict(tree_flatten(drafter.parameters())))
        mx.save_safetensors(str(staging / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        (staging / "state.json").write_text(json.dumps({"identity": ident, "progress": asdict(progress)}))
        _move_into_place(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load_checkpoint(directory: Path, drafter: Drafter, optimizer: optim.Optimizer, ident: Dict) -> Progress:
    state = json.loads((directory / "state.json").read_text())
    saved = state["identity"]
    if saved != ident:
        changed = sorted(k for k in ident["settings"] if saved["settings"].get(k) != ident["settings"][k])
        what = f"settings {', '.join('--' + k.replace('_', '-') for k in changed)}" if changed else "training data"
        raise ValueError(f"{directory} was written with other {what}: resume with the same ones, "
                         "or delete the checkpoint to start over")
    drafter.load_weights(list(mx.load(str(directory / "drafter.safetensors")).items()))
    optimizer.state = tree_unflatten(list(mx.load(str(directory / "optimizer.safetensors")).items()))
    return Progress(**state["progress"])


# ---------------------------------------------------------------------------
# Training


def compiled_step(drafter: Drafter, optimizer: optim.Optimizer, s: Settings):
    """One optimizer step on a teacher batch, compiled: (embeds, hidden, probs, kv) -> loss."""
    loss_and_grad = nn.value_and_grad(
        drafter, lambda model, t: drafter_loss(model, t, s.draft_steps, s.centroid_loss_weight)
    )
    state = [drafter.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(embeds, hidden, probs, kv):
        loss, grads = loss_and_grad(drafter, Teacher(embeds, hidden, probs, kv))
        grads, _ = optim.clip_grad_norm(grads, s.grad_clip)
        optimizer.update(drafter, grads)
        return loss

    return step


def run_steps(target: Target, drafter: Drafter, optimizer, corpus: Corpus, s: Settings, progress: Progress,
              evaluate, checkpoint) -> None:
    """Train from `progress.step` to `s.steps`, evaluating and checkpointing on the way."""
    step = compiled_step(drafter, optimizer, s)
    tokens_per_step = s.batch_size * s.seq_len
    bar = tqdm(total=s.steps, initial=progress.step, desc="train-drafter", unit="step", mininterval=1.0,
               file=sys.stderr, dynamic_ncols=True)
    done, start = 0, time.perf_counter()
    with bar:
        while progress.step < s.steps:
            tokens = mx.array(data.batch(corpus.stream, s.seq_len, s.batch_size, s.seed, progress.step, corpus.bos))
            t = teacher(target, tokens)
            loss = step(t.embeds, t.hidden, t.probs, t.kv)
            mx.eval(loss, drafter.state, optimizer.state)
            progress.losses.append(loss.item())
            progress.step += 1
            done += 1
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{np.mean(progress.losses[-20:]):.3f}", tok_s=f"{tokens_per_step * done / elapsed:.0f}")
            bar.update(1)
            if progress.step < s.steps:
                if s.eval_every and progress.step % s.eval_every == 0:
                    progress.seconds += time.perf_counter() - start
                    evaluate(progress)
                    bar.write(f"step {progress.step}: mean accepted length {progress.evals[-1]['mean_accepted_length']:.3f}")
                    start, done = time.perf_counter(), 0
                if s.checkpoint_every and progress.step % s.checkpoint_every == 0:
                    checkpoint(progress)
    progress.seconds += time.perf_counter() - start


def train(s: Settings) -> Dict:
    """Train as `s` says and write the drafter to `s.out`; returns what training.json holds."""
    s.check()
    out = Path(s.out).expanduser().absolute()
    ckpt = s.checkpoint_dir
    if out.exists():
        raise ValueError(f"{out} already exists: choose a new output directory (or delete it)")
    if s.resume and not (ckpt / "state.json").is_file():
        raise ValueError(f"nothing to resume: no checkpoint at {ckpt}; run without --resume")
    if not s.resume and ckpt.exists():
        raise ValueError(f"{ckpt} holds a checkpoint of an earlier run: add --resume to continue it, "
                         "or delete it to start over")

    target, tokenizer = load_frozen_target(s.model, s.adapter_path)
    drafter, config, generation = initial_drafter(target, tokenizer, s)
    corpus = prepare_data(target, tokenizer, s)
    optimizer = optim.Adam(learning_rate=learning_rate_schedule(s), betas=[0.9, 0.95], bias_correction=True)
    optimizer.init(drafter.trainable_parameters())
    ident = identity(s, corpus)
    progress = load_checkpoint(ckpt, drafter, optimizer, ident) if s.resume else Progress()

    def evaluate(p: Progress) -> None:
        if corpus.prompts:
            mean = mean_accepted_length(target, tokenizer, drafter, corpus.prompts, s)
            p.evals.append({"step": p.step, "mean_accepted_length": round(mean, 4)})

    if not progress.evals:
        evaluate(progress)
    run_steps(target, drafter, optimizer, corpus, s, progress, evaluate,
              lambda p: save_checkpoint(ckpt, drafter, optimizer, p, ident))
    if not progress.evals or progress.evals[-1]["step"] != progress.step:
        evaluate(progress)
    log = training_log(s, corpus, progress)
    write_output(out, drafter, config, generation, log)
    shutil.rmtree(ckpt, ignore_errors=True)
    return log


def training_log(s: Settings, corpus: Corpus, progress: Progress) -> Dict:
    import mlx_lm

    evals = progress.evals
    return {
        "settings": asdict(s),
        "data": corpus.record,
        "steps": progress.step,
        "train_seconds": round(progress.seconds, 1),
        "train_tokens_per_second": round(progress.step * s.batch_size * s.seq_len / max(progress.seconds, 1e-9), 1),
        "loss_first": progress.losses[0] if progress.losses else None,
        "loss_last": progress.losses[-1] if progress.losses else None,
        "losses": [round(x, 5) for x in progress.losses],
        "mean_accepted_length_before": evals[0]["mean_accepted_length"] if evals else None,
        "mean_accepted_length_after": evals[-1]["mean_accepted_length"] if evals else None,
        "evaluations": evals,
        "versions": {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "python": platform.python_version()},
    }


# ---------------------------------------------------------------------------
# Output


def write_output(out: Path, drafter: Drafter, config: Dict, generation: Dict, log: Dict) -> None:
    """The drafter in Google's Hugging Face layout plus training.json, written to a temporary
    directory beside `out` and renamed into place."""
    staging = _staging_dir(out)
    try:
        weights = dict(tree_flatten(drafter.parameters()))
        key = "masked_embedding.token_ordering"
        if key in weights:
            weights[key] = weights[key].astype(mx.int64)  # transformers keeps it int64
        mx.save_safetensors(str(staging / "model.safetensors"), weights, metadata={"format": "pt"})
        mx.load(str(staging / "model.safetensors"))  # MLX does not report short writes; a read-back does
        for name, content in (("config.json", config), ("generation_config.json", generation),
                              ("training.json", log)):
            (staging / name).write_text(json.dumps(content, indent=2, sort_keys=name == "config.json") + "\n")
        if out.exists():
            raise ValueError(f"{out} appeared while training: choose a new output directory")
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------
# Command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = Settings(model="", out="")
    p.add_argument("--model", required=True, help="the frozen target: directory or Hub repo id (HF or converted, "
                                                   "float or quantized)")
    p.add_argument("--adapter-path", default=None, help="an mlx-lm LoRA/DoRA/full adapter applied to the target")
    p.add_argument("--draft-model", default=None, help="the drafter to start from; unset: a fresh one "
                                                        "(--hidden-size, --num-layers, ...)")
    p.add_argument("--data", nargs="+", default=[], metavar="PATH",
                   help="text files, directories of them, or JSONL ({\"text\"} or chat {\"messages\"})")
    p.add_argument("--self-generate", type=int, default=0, metavar="N",
                   help="also train on N texts the target writes itself (from the --data documents' starts)")
    p.add_argument("--self-generate-temp", type=float, default=d.self_generate_temp, help="their sampling temperature")
    p.add_argument("--eval-data", nargs="+", default=[], metavar="PATH",
                   help="held-out text for evaluation; unset: the end of --data is held out")
    p.add_argument("-o", "--out", required=True, help="output directory (must not exist)")
    for name, help_ in (("steps", "optimizer steps"), ("batch_size", "sequences per step"),
                        ("seq_len", "tokens per sequence (after BOS)"),
                        ("draft_steps", "draft steps unrolled at each position"),
                        ("warmup_steps", "linear warm-up steps"), ("seed", "seed for initialisation and data order"),
                        ("hidden_size", "fresh drafter: hidden size"), ("num_layers", "fresh drafter: layers"),
                        ("num_heads", "fresh drafter: attention heads"),
                        ("intermediate_size", "fresh drafter: MLP size (unset: 4 x hidden)"),
                        ("num_centroids", "fresh drafter: centroid head size (0: dense head)"),
                        ("centroid_top_k", "fresh drafter: centroids scored per step"),
                        ("num_assistant_tokens", "generation_config's draft length (unset: --draft-steps, "
                                                 "or the initial drafter's)"),
                        ("eval_every", "evaluate every N steps (0: only before and after)"),
                        ("eval_prompts", "held-out prompts (0: no evaluation)"),
                        ("eval_prompt_tokens", "tokens per prompt"), ("eval_max_tokens", "tokens generated per prompt"),
                        ("eval_draft_tokens", "k for the evaluation"),
                        ("checkpoint_every", "checkpoint every N steps (0: never)")):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name), help=help_)
    for name, help_ in (("learning_rate", "peak learning rate (Adam)"),
                        ("min_lr_ratio", "final learning rate / peak (cosine decay)"),
                        ("grad_clip", "gradient norm clip"), ("centroid_loss_weight", "weight of the centroid loss")):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(d, name), help=help_)
    p.add_argument("--resume", action="store_true", help="continue from OUT.checkpoint")


def run(args: argparse.Namespace) -> None:
    """`gemma-mtp train-drafter`. A SIGTERM stops like Ctrl-C (the last checkpoint stays)."""
    settings = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        log = train(settings)
    finally:
        signal.signal(signal.SIGTERM, previous)
    before, after = log["mean_accepted_length_before"], log["mean_accepted_length_after"]
    acceptance = f"; mean accepted length (k={settings.eval_draft_tokens}) {before:.2f} -> {after:.2f}" \
        if before is not None else ""
    print(f"wrote {Path(settings.out).expanduser().absolute()}: {log['steps']} steps in {log['train_seconds']:.0f} s, "
          f"loss {log['loss_first']:.3f} -> {log['loss_last']:.3f}{acceptance}")
