"""The MTP drafter: Google's `gemma4_assistant` / `gemma4_unified_assistant` checkpoints on MLX.

A few Gemma 4 decoder layers (mlx-lm's own `DecoderLayer`, built with every layer
K/V-shared) that read the target's K/V instead of computing their own. One draft step
takes the newest token and the target hidden state that produced it, at a fixed position
P, and returns the next token's logits and a projected hidden state for the next step.
"""

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import gemma4_text

from .cache import SharedKV
from .checkpoint import (
    CheckpointError,
    check_model_type,
    head_dim,
    kv_heads,
    load_safetensors,
    mlx_lm_text_config,
    quantization,
    read_config,
    resolve_path,
)

DEFAULT_NUM_DRAFT_TOKENS = 4
MAX_SAMPLED_GRAPHS = 32  # compiled sampled drafts kept (one per draft length and set of sampling options)


def _published_pair(size: str) -> str:
    base = f"google/gemma-4-{size}-it"
    return (
        f"{base} with {base}-assistant (a QAT target {base}-qat-q4_0-unquantized "
        f"with {base}-qat-q4_0-unquantized-assistant)"
    )


# backbone hidden size -> the published pair, for error messages
KNOWN_PAIRS = {
    hidden: _published_pair(size)
    for hidden, size in {1536: "E2B", 2560: "E4B", 3840: "12B", 2816: "26B-A4B", 5376: "31B"}.items()
}


@dataclass
class DrafterArgs:
    text: gemma4_text.ModelArgs
    backbone_hidden_size: int
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    num_assistant_tokens: Optional[int] = None

    @classmethod
    def from_config(cls, config: Dict, generation_config: Optional[Dict] = None):
        text = mlx_lm_text_config(config.get("text_config") or {})
        text["num_kv_shared_layers"] = text.get("num_hidden_layers", 4)
        text.setdefault("hidden_size_per_layer_input", 0)
        text.setdefault("use_double_wide_mlp", False)
        text.setdefault("final_logit_softcapping", None)
        return cls(
            text=gemma4_text.ModelArgs.from_dict(text),
            backbone_hidden_size=config.get("backbone_hidden_size", _default_backbone(config)),
            use_ordered_embeddings=config.get("use_ordered_embeddings", False),
            num_centroids=config.get("num_centroids", 2048),
            centroid_intermediate_top_k=config.get("centroid_intermediate_top_k", 32),
            num_assistant_tokens=(generation_config or {}).get("num_assistant_tokens"),
        )


def _default_backbone(config: Dict) -> int:
    """transformers' default: the 12B's width for its assistant, E2B's otherwise."""
    return 3840 if config.get("model_type") == "gemma4_unified_assistant" else 1536


class CentroidHead(nn.Module):
    """Scores only the tokens of the top-k centroids (E2B/E4B drafters).

    `token_ordering` lists token ids cluster by cluster: centroid c owns the contiguous
    block `token_ordering[c * per : (c + 1) * per]`, `per = vocab / num_centroids`.
    """

    def __init__(self, args: DrafterArgs):
        super().__init__()
        vocab = args.text.vocab_size
        self.top_k = args.centroid_intermediate_top_k
        self.num_centroids = args.num_centroids
        self.per_centroid = vocab // args.num_centroids
        self.centroids = nn.Linear(args.text.hidden_size, args.num_centroids, bias=False)
        self.token_ordering = mx.zeros((vocab,), dtype=mx.int32)

    def candidates(self, x: mx.array, embedding: nn.Module) -> Tuple[mx.array, mx.array]:
        """x [..., H] -> (candidate ids [..., top_k * per], their logits [..., top_k * per])."""
        centroid_logits = self.centroids(x)  # [..., num_centroids]
        top = mx.argpartition(-centroid_logits, kth=self.top_k - 1, axis=-1)[..., : self.top_k]
        ordering = self.token_ordering.reshape(self.num_centroids, self.per_centroid)
        ids = ordering[top].reshape(*x.shape[:-1], -1)
        rows = embedding(ids)  # [..., N, H]; works for quantized embeddings too
        return ids, (rows @ x[..., None])[..., 0]


class DrafterModel(nn.Module):
    def __init__(self, args: gemma4_text.ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [gemma4_text.DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class Drafter(nn.Module):
    def __init__(self, args: DrafterArgs):
        super().__init__()
        self.args = args
        hidden, backbone = args.text.hidden_size, args.backbone_hidden_size
        self.model = DrafterModel(args.text)
        self.pre_projection = nn.Linear(2 * backbone, hidden, bias=False)
        self.post_projection = nn.Linear(hidden, backbone, bias=False)
        if args.use_ordered_embeddings:
            self.masked_embedding = CentroidHead(args)
        self._graphs = None  # DraftGraphs for the last target embedding drafted with

    @property
    def default_num_draft_tokens(self) -> int:
        return self.args.num_assistant_tokens or DEFAULT_NUM_DRAFT_TOKENS

    def step(
        self,
        token_embedding: mx.array,
        hidden: mx.array,
        position,
        shared_kv: Dict[str, SharedKV],
        masks: Optional[Dict[str, mx.array]] = None,
    ) -> Tuple[mx.array, mx.array]:
        """One draft step at `position` (an int, or each row's position [B]), run op by op
        (`draft` runs the compiled form).

        token_embedding, hidden: [B, 1, backbone] (the target's scaled embedding of the
        newest token, and the hidden state that produced it). shared_kv: per layer type, a
        `SharedKV` or a (keys, values) pair that is all visible. `masks` (per layer type,
        [B, 1, 1, S]) select each row's keys when rows differ in length.
        Returns (final-norm drafter state [B, 1, H], projected hidden [B, 1, backbone]).
        """
        views = {t: SharedKV(*kv).views() for t, kv in shared_kv.items()}
        return self.forward(token_embedding, hidden, position, views, masks or {})

    def forward(self, token_embedding, hidden, position, kv, masks):
        """The step's layers. kv: per layer type (keys, values) [B, kv_heads, S, D];
        masks: per layer type a visibility mask broadcastable to [B, heads, 1, S], or none;
        position: an int or an int32 array."""
        x = self.pre_projection(mx.concatenate([token_embedding, hidden], axis=-1))
        for layer in self.model.layers:
            kind = layer.layer_type
            x, _, _ = layer(x, mask=masks.get(kind), shared_kv=kv[kind], offset=position)
        x = self.model.norm(x)
        return x, self.post_projection(x)

    def _softcap(self, logits: mx.array) -> mx.array:
        cap = self.args.text.final_logit_softcapping
        return logits if cap is None else gemma4_text.logit_softcap(cap, logits)

    def logits(self, x: mx.array) -> mx.array:
        """Full-vocabulary logits [..., vocab] of step states [..., H]; -inf outside the
        centroid candidates."""
        if not self.args.use_ordered_embeddings:
            return self._softcap(self.model.embed_tokens.as_linear(x))
        ids, scores = self.masked_embedding.candidates(x, self.model.embed_tokens)
        full = mx.full((*x.shape[:-1], self.args.text.vocab_size), -mx.inf, dtype=scores.dtype)
        return mx.put_along_axis(full, ids, self._softcap(scores), axis=-1)

    def greedy_token(self, x: mx.array) -> mx.array:
        """The most likely next token of step states [..., H]: [...] int."""
        if not self.args.use_ordered_embeddings:
            return mx.argmax(self.model.embed_tokens.as_linear(x), axis=-1)
        ids, scores = self.masked_embedding.candidates(x, self.model.embed_tokens)
        return mx.take_along_axis(ids, mx.argmax(scores, axis=-1, keepdims=True), axis=-1)[..., 0]

    def draft(
        self,
        embed: Callable[[mx.array], mx.array],
        token: mx.array,
        hidden: mx.array,
        position: int,
        shared_kv: Dict[str, SharedKV],
        num_tokens: int,
        sample: Optional[Callable] = None,
        keys: Optional[mx.array] = None,
    ) -> Tuple[mx.array, Optional[mx.array]]:
        """Draft `num_tokens` tokens after `token` (at `position`), with compiled steps.

        Without `sample` drafting is greedy. With `keys` ([num_tokens, 2], one random key
        per draft), `sample(logits [1, vocab], key) -> (token [1], log q [1, vocab])` draws
        each draft from the drafter's processed distribution; it must be a pure MLX
        function, traced into the graph. Both run all `num_tokens` steps as one compiled
        graph. Without `keys`, `sample(tokens [j + 1], logits [1, vocab])` is given `token`
        and the j drafts before it (logits processors read them) and runs op by op between
        compiled steps. Returns (drafts [num_tokens], log q [num_tokens, vocab] or None
        when greedy). Builds one lazy graph: nothing here waits for the device.
        """
        if self._graphs is None or self._graphs.embed != embed:
            self._graphs = DraftGraphs(self, embed)
        position = mx.array(position, dtype=mx.int32)
        kv = {t: self._graphs.inputs(SharedKV(*v)) for t, v in shared_kv.items()}
        if sample is None:
            return self._graphs.greedy(num_tokens)(token, hidden, position, kv), None
        if keys is not None:
            return self._graphs.sampled(num_tokens, sample)(token, hidden, position, kv, keys)
        first, drafts, draft_logprobs = token, [], []
        for _ in range(num_tokens):
            logits, hidden = self._graphs.logits_step(token, hidden, position, kv)
            token, logq = sample(mx.concatenate([first, *drafts]), logits)
            drafts.append(token)
            draft_logprobs.append(logq)
        return mx.concatenate(drafts), mx.concatenate(draft_logprobs)

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        weights = {
            k: v
            for k, v in weights.items()
            if not k.startswith("lm_head.") and "rotary_emb" not in k
        }
        key = "masked_embedding.token_ordering"
        if key in weights:
            weights[key] = weights[key].astype(mx.int32)
        return weights


class DraftGraphs:
    """A drafter's draft steps compiled with `mx.compile`, for one target embedding.

    Everything that changes between rounds is an array input: the position P (RoPE), and
    per layer type the whole K/V buffer with the visible slots `[start, end)` as numbers
    (a mask). Caches grow their buffers in blocks (mlx-lm's `KVCache` by 256 positions),
    so one compiled graph serves every round until a buffer grows. The drafter's weights
    are inputs too (a reloaded drafter is seen); the target's embedding is captured.
    """

    def __init__(self, drafter: Drafter, embed: Callable[[mx.array], mx.array]):
        self.drafter = drafter
        self.embed = embed
        self._greedy = {}  # num_tokens -> compiled greedy draft
        self._sampled = {}  # (num_tokens, sample) -> compiled sampled draft
        self.logits_step = mx.compile(self._logits_step, inputs=[drafter.state])

    @staticmethod
    def inputs(kv: SharedKV):
        """(keys, values, start, end) with the span as int32 arrays."""
        end = kv.keys.shape[2] if kv.end is None else kv.end
        return kv.keys, kv.values, mx.array(kv.start, dtype=mx.int32), mx.array(end, dtype=mx.int32)

    def greedy(self, num_tokens: int) -> Callable:
        """(token [1], hidden [1, 1, backbone], position, kv) -> drafts [num_tokens]."""
        if num_tokens not in self._greedy:
            self._greedy[num_tokens] = mx.compile(
                partial(self._greedy_draft, num_tokens), inputs=[self.drafter.state]
            )
        return self._greedy[num_tokens]

    def sampled(self, num_tokens: int, sample: Callable) -> Callable:
        """(token, hidden, position, kv, keys [num_tokens, 2]) -> (drafts [num_tokens],
        log q [num_tokens, vocab]), each draft drawn by `sample(logits, key)`."""
        graph = (num_tokens, sample)
        if graph not in self._sampled:
            if len(self._sampled) >= MAX_SAMPLED_GRAPHS:  # many sampling options (a server's requests)
                self._sampled.clear()
            self._sampled[graph] = mx.compile(
                partial(self._sampled_draft, num_tokens, sample), inputs=[self.drafter.state]
            )
        return self._sampled[graph]

    def _forward(self, token, hidden, position, kv):
        """One step from the newest token [1]: (state [1, 1, H], projected hidden)."""
        buffers, masks = {}, {}
        for kind, (keys, values, start, end) in kv.items():
            slots = mx.arange(keys.shape[2])
            buffers[kind] = (keys, values)
            masks[kind] = ((slots >= start) & (slots < end))[None, None, None]  # [1, 1, 1, S]
        return self.drafter.forward(self.embed(token)[None], hidden, position, buffers, masks)

    def _greedy_draft(self, num_tokens, token, hidden, position, kv):
        drafts = []
        for _ in range(num_tokens):
            state, hidden = self._forward(token, hidden, position, kv)
            token = self.drafter.greedy_token(state)[0]  # [1]
            drafts.append(token)
        return mx.concatenate(drafts)

    def _sampled_draft(self, num_tokens, sample, token, hidden, position, kv, keys):
        drafts, logqs = [], []
        for i in range(num_tokens):
            logits, hidden = self._logits_step(token, hidden, position, kv)
            token, logq = sample(logits, keys[i])
            drafts.append(token)
            logqs.append(logq)
        return mx.concatenate(drafts), mx.concatenate(logqs)

    def _logits_step(self, token, hidden, position, kv):
        """-> (logits [1, vocab], projected hidden [1, 1, backbone])."""
        state, hidden = self._forward(token, hidden, position, kv)
        return self.drafter.logits(state)[0], hidden


def load_drafter(path_or_repo) -> Drafter:
    """Load a Gemma 4 drafter (HF layout, or one this package converted)."""
    path = resolve_path(str(path_or_repo))
    config = read_config(path)
    check_model_type(path, config, "drafter")
    generation_file = path / "generation_config.json"
    generation = json.loads(generation_file.read_text()) if generation_file.is_file() else None
    drafter = Drafter(DrafterArgs.from_config(config, generation))
    weights = drafter.sanitize(load_safetensors(path))
    quant = quantization(config)
    if quant:
        nn.quantize(
            drafter,
            group_size=quant["group_size"],
            bits=quant["bits"],
            class_predicate=lambda p, m: f"{p}.scales" in weights,
        )
    try:
        drafter.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise CheckpointError(f"{path}: the drafter weights do not match its config.json ({e})") from e
    mx.eval(drafter.parameters())
    drafter.eval()
    return drafter


def check_pair(target, drafter: Drafter) -> None:
    """Raise a CheckpointError naming both values if the drafter cannot draft for the target.

    The drafter computes no K/V: each of its layers attends to the target's K/V of the same
    layer type, so the K/V head count and head dim are the target's. It works when its
    queries have that head dim and their head count is a multiple of the target's K/V
    heads; its own config's K/V head counts play no part.
    """
    t, d = target.args, drafter.args.text
    hint = KNOWN_PAIRS.get(t.hidden_size)
    pairing = f": pair {hint}" if hint else ": use the assistant published with this target"

    def mismatch(what: str, drafter_value, target_value):
        return CheckpointError(
            f"drafter expects {what} {drafter_value}, the target has {target_value}{pairing}"
        )

    if drafter.args.backbone_hidden_size != t.hidden_size:
        raise mismatch("backbone_hidden_size", drafter.args.backbone_hidden_size, t.hidden_size)
    if d.vocab_size != t.vocab_size:
        raise mismatch("vocab_size", d.vocab_size, t.vocab_size)
    for layer_type in sorted(set(d.layer_types)):
        if layer_type not in target.producers:
            raise mismatch("a K/V-producing layer of type", layer_type, "none")
        name = layer_type.replace("_attention", "")
        if head_dim(d, layer_type) != head_dim(t, layer_type):
            raise mismatch(f"{name} head_dim", head_dim(d, layer_type), head_dim(t, layer_type))
        if d.num_attention_heads % kv_heads(t, layer_type):
            raise CheckpointError(
                f"the drafter's {d.num_attention_heads} query heads are not a multiple of the "
                f"target's {kv_heads(t, layer_type)} {name} key/value heads{pairing}"
            )
