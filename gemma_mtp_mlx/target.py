"""The target: mlx-lm's Gemma 4 model, seen the way speculation needs it.

mlx-lm's `gemma4_text` (or multimodal `gemma4`) model does the work, for every size (the
12B's `gemma4_unified` / `gemma4_unified_text` configs are mapped onto those). This wrapper
adds one verify forward that returns logits *and* final-norm hidden states for every input
position, and zero-copy views of the K/V that the drafter reads: those of the last
K/V-computing layer of each attention type. A multimodal checkpoint's vision tower comes
along (`Target.vision`, media/); prefill chunks holding images run through media/merge.py.
"""

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache
from mlx_lm.models.gemma4_text import logit_softcap
from mlx_lm.utils import load_model, load_tokenizer

from .batch.cache import RaggedKVCache
from .cache import (SharedKV, SlidingKVCache, commit_write, make_target_cache, num_kv_layers, reserve_write,
                    visible_slots)
from .quantized_cache import QuantizedFullKVCache
from .checkpoint import (CheckpointError, check_model_type, load_safetensors, mlx_lm_text_config, read_config,
                         weights_load_error)
from .media.images import Vision, load_vision
from .media.merge import MediaChunk, forward_with_media
from .validate import MAX_NUM_DRAFT_TOKENS

# Forwards of up to this many tokens (a decode step, a verify of k + 1) run compiled;
# longer ones (prefill chunks, training batches) run op by op, as their lengths vary.
MAX_COMPILED_TOKENS = MAX_NUM_DRAFT_TOKENS + 1


class Target:
    def __init__(self, model: nn.Module, vision: Optional[Vision] = None, placeholder_ids: Tuple[int, ...] = (),
                 pad_token_id: int = 0):
        self.model = model
        self.vision = vision  # the image encoder and processor; None: text only
        # Media placeholder ids embed as the pad id wherever they stand (a generated one too),
        # as transformers' multimodal Gemma4Model embeds them.
        self.placeholder_ids, self.pad_token_id = placeholder_ids, pad_token_id
        self.lm = getattr(model, "language_model", model)  # gemma4_text.Model
        self.args = self.lm.args
        self.backbone = self.lm.model  # gemma4_text.Gemma4TextModel
        # The producer of each attention type: the last layer of that type computing K/V.
        self.producers = {self.args.layer_types[i]: i for i in range(num_kv_layers(self.args))}
        self.compiled = CompiledForward(self)

    @property
    def hidden_size(self) -> int:
        return self.args.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.args.vocab_size

    @property
    def modalities(self) -> Tuple[str, ...]:
        """What the model reads: ("text",) or ("text", "image")."""
        return ("text",) + (("image",) if self.vision is not None else ())

    def make_cache(self, max_draft: int, **kv) -> List:
        """`kv`: kv_bits, kv_group_size, quantized_kv_start (make_target_cache)."""
        return make_target_cache(self.args, max_draft, **kv)

    def embed(self, tokens: mx.array) -> mx.array:
        """The scaled token embedding the target feeds its first layer: [..., hidden]."""
        return self.backbone.embed_tokens(tokens) * self.backbone.embed_scale

    def __call__(self, tokens: mx.array, cache: List, unsettled: Optional[mx.array] = None,
                 media: Optional[MediaChunk] = None) -> Tuple[mx.array, mx.array]:
        """tokens [1, L] -> (logits [1, L, vocab], final-norm hidden [1, L, hidden]).

        `unsettled` (int32 []): how many of the cache's newest positions are dropped before
        these tokens, a count still on the device (the previous round's rejected drafts);
        the caches' own offsets still count them. Needs the compiled forward.
        `media`: the images inside these tokens (a prefill chunk; media/merge.py)."""
        if media is not None:
            return forward_with_media(self, self.text_ids(tokens), cache, media, self.pad_token_id)
        if unsettled is not None or self.compiled.handles(tokens, cache):
            return self.compiled(tokens, cache, unsettled)
        hidden = self.backbone(self.text_ids(tokens), cache=cache)
        return self.logits(hidden), hidden

    def text_ids(self, tokens: mx.array) -> mx.array:
        """`tokens` with every media placeholder id replaced by the pad id."""
        for placeholder in self.placeholder_ids:
            tokens = mx.where(tokens == placeholder, self.pad_token_id, tokens)
        return tokens

    def logits(self, hidden: mx.array) -> mx.array:
        """Logits [..., vocab] of final-norm hidden states [..., hidden]."""
        if self.lm.tie_word_embeddings:
            logits = self.backbone.embed_tokens.as_linear(hidden)
        else:
            logits = self.lm.lm_head(hidden)
        if self.lm.final_logit_softcapping is not None:
            logits = logit_softcap(self.lm.final_logit_softcapping, logits)
        return logits

    def drafter_kv(self, cache: List, unsettled: Optional[mx.array] = None) -> Dict[str, SharedKV]:
        """The producers' K/V buffers and the verified slots the drafter sees, per layer type.

        Full attention: every cached position. Sliding: the last `window + 1` positions,
        the span the drafter's inclusive sliding window covers. With `unsettled` (as in
        `__call__`) the span's ends are arrays.
        """
        kv = {}
        for layer_type, i in self.producers.items():
            c = cache[i]
            end = (c.used if isinstance(c, SlidingKVCache) else c.offset) - (0 if unsettled is None else unsettled)
            if isinstance(c, QuantizedFullKVCache):  # dequantized, as the target's attention reads it
                kv[layer_type] = SharedKV(*c.fetch(), 0, end)
                continue
            if not isinstance(c, SlidingKVCache):
                start = 0
            elif unsettled is None:
                start = max(0, end - self.args.sliding_window - 1)
            else:
                start = mx.maximum(end - self.args.sliding_window - 1, 0)
            kv[layer_type] = SharedKV(c.keys, c.values, start, end)
        return kv


class CompiledForward:
    """The target's short forwards (a decode step, a verify) as compiled graphs, one per shape.

    Everything that changes between steps is an array input: each layer's whole K/V
    buffer and, per row, the slot its new entries go to, the position of the first and
    the position slot 0 holds. One graph serves every step until a buffer grows (a
    full-attention buffer by 256 positions, a sliding one when it slides) or the batch
    changes size. The written buffers come back as outputs. Attention runs over the whole
    buffer, masked to the slots each query may see. Compiling fuses a layer's many small
    element-wise operations (norms, RoPE, activations), which take most of a decode step
    when the matrices are small, and shortens the host's graph building, which a
    speculative round waits for. The weights are inputs too, so changed weights are seen.
    """

    CACHES = (SlidingKVCache, KVCache, RaggedKVCache)  # exactly these types: a subclass may write differently

    def __init__(self, target: "Target"):
        self.target = target
        self.layer_types = target.args.layer_types[: num_kv_layers(target.args)]
        self._forward = mx.compile(self._graph, inputs=[target.model.state])

    def handles(self, tokens: mx.array, cache: List) -> bool:
        """Whether this forward can run compiled: a short one, on the target's own caches
        after their first write."""
        return self.handles_length(tokens.shape[1], cache)

    def handles_length(self, num_new: int, cache: List) -> bool:
        return (
            cache is not None
            and num_new <= MAX_COMPILED_TOKENS
            and len(cache) == len(self.layer_types)
            and all(type(c) in self.CACHES and c.keys is not None for c in cache)
        )

    def __call__(self, tokens: mx.array, cache: List, unsettled: Optional[mx.array] = None) -> Tuple[mx.array, mx.array]:
        """As `Target.__call__`; with `unsettled`, room is made as if none of those
        positions were dropped, and the new entries go that many slots earlier."""
        num_new = tokens.shape[1]
        buffers, rows = [], {}
        for c, kind in zip(cache, self.layer_types):
            if isinstance(c, RaggedKVCache):
                slots, positions, starts = c.reserve(num_new), c.lengths, c.starts
            else:
                slot, start = reserve_write(c, num_new)
                slots, positions, starts = [slot], [c.offset], [start]
            buffers.append((c.keys, c.values))
            if kind not in rows:  # the same for every layer of a type: their buffers move together
                positions, slots, starts = (mx.array(r, dtype=mx.int32) for r in (positions, slots, starts))
                if unsettled is not None:
                    positions, slots = positions - unsettled, slots - unsettled
                rows[kind] = positions, slots, starts
        logits, hidden, written = self._forward(tokens, buffers, rows)
        for c, (keys, values) in zip(cache, written):
            if isinstance(c, RaggedKVCache):
                c.advance(keys, values, num_new)
            else:
                commit_write(c, keys, values, num_new)
        return logits, hidden

    def _graph(self, tokens, buffers, rows):
        """buffers: each layer's (keys, values); rows: per layer type, each row's first new
        position, write slot and the position its slot 0 holds ([B] int32 each)."""
        num_new = tokens.shape[1]
        masks, caches = {}, []
        for (keys, values), kind in zip(buffers, self.layer_types):
            positions, slots, starts = rows[kind]
            if kind not in masks:
                window = self.target.args.sliding_window if kind == "sliding_attention" else None
                masks[kind] = visible_slots(positions, starts, num_new, keys.shape[2], window)
            caches.append(_SlotCache(keys, values, positions, slots[:, None] + mx.arange(num_new)[None], masks[kind]))
        hidden = self.target.backbone(self.target.text_ids(tokens), cache=caches)
        return self.target.logits(hidden), hidden, [(c.keys, c.values) for c in caches]


class _SlotCache:
    """One layer's cache inside the compiled forward, as mlx-lm's attention uses a cache:
    `offset` (each row's first new position [B]), `update_and_fetch` (writes row b's new
    entries at slots[b], returns the whole buffer) and `make_mask` (which slots each new
    token sees)."""

    def __init__(self, keys: mx.array, values: mx.array, offset: mx.array, slots: mx.array, mask: mx.array):
        self.keys, self.values, self.offset, self.slots, self.mask = keys, values, offset, slots, mask

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        # keys, values: [B, kv_heads, L, D], written into [B, kv_heads, S, D]
        index = self.slots[:, None, :, None]  # [B, 1, L, 1]
        self.keys = mx.put_along_axis(self.keys, mx.broadcast_to(index, keys.shape), keys, axis=2)
        self.values = mx.put_along_axis(self.values, mx.broadcast_to(index, values.shape), values, axis=2)
        return self.keys, self.values

    def make_mask(self, *args, **kwargs) -> mx.array:
        return self.mask  # [B, 1, L, S]


def load_target(path: Path, lazy: bool = False):
    """Load a Gemma 4 target and its tokenizer from a local checkpoint directory."""
    config = read_config(path)
    check_model_type(path, config, "target")
    try:
        model, mlx_config = load_model(path, lazy=lazy, model_config=mlx_lm_config(config))
    except Exception as e:  # unreadable, truncated or mismatched weight files
        raise weights_load_error(path, "model*.safetensors", e) from e
    # The 12B's encoder-free embedders (gemma4_unified) are not read yet: it loads as text only.
    vision = None
    if config["model_type"] == "gemma4" and config.get("vision_config"):
        try:
            vision = load_vision(path, config, load_safetensors(path))
        except ValueError as e:  # weights missing or of other shapes than vision_config says
            raise CheckpointError(f"{path}: the vision tower's weights do not fit its vision_config ({e})") from e
        if not lazy:
            mx.eval(vision.encoder.parameters())
    target = Target(model, vision, *placeholders(config, model.args.vocab_size))
    return target, _load_tokenizer(path, mlx_config)


# The placeholder ids of transformers' Gemma4Config (its defaults, where a config omits them).
PLACEHOLDER_IDS = {"image_token_id": 258_880, "audio_token_id": 258_881, "video_token_id": 258_884}


def placeholders(config: Dict, vocab_size: int) -> Tuple[Tuple[int, ...], int]:
    """(the media placeholder ids inside the vocabulary, the pad id) of a multimodal
    `gemma4` checkpoint, whose transformers model embeds those ids as the pad id; none for
    other layouts."""
    if config.get("model_type") != "gemma4":
        return (), 0
    ids = (config.get(name, default) for name, default in PLACEHOLDER_IDS.items())
    pad = (config.get("text_config") or {}).get("pad_token_id") or 0
    return tuple(i for i in ids if i is not None and 0 <= i < vocab_size), pad


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def _load_tokenizer(path: Path, config: Dict):
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{path} has no tokenizer files ({' or '.join(TOKENIZER_FILES)}): "
            "copy them from the original checkpoint"
        )
    try:
        return load_tokenizer(path, eos_token_ids=_eos_ids(config, path))
    except Exception as e:
        raise CheckpointError(
            f"the tokenizer files in {path} could not be read ({type(e).__name__}: {e}); "
            "copy them again from the original checkpoint"
        ) from e


def mlx_lm_config(config: Dict) -> Dict:
    """A target config.json as mlx-lm 0.32 reads it (it updates the file's config).

    A text-only target (`gemma4_text`, `gemma4_unified_text`) becomes a `gemma4_text`
    config in the published form. The multimodal layout (`gemma4`, `gemma4_unified`)
    becomes `gemma4` with such a text config and the text vocabulary size at the top
    level, where mlx-lm reads it.
    """
    if config["model_type"] in ("gemma4_text", "gemma4_unified_text"):
        return mlx_lm_text_config(config)
    text_config = mlx_lm_text_config(config.get("text_config") or {})
    return {
        "model_type": "gemma4",
        "text_config": text_config,
        "vocab_size": config.get("vocab_size", text_config.get("vocab_size", 262144)),
    }


def _eos_ids(config: Dict, path: Path):
    """The end-of-generation ids: config.json's and generation_config.json's together
    (Google's checkpoints list the end of a turn, and more, only in the latter)."""
    ids = []
    generation = path / "generation_config.json"
    sources = [config, config.get("text_config") or {}]
    if generation.is_file():
        try:
            sources.append(json.loads(generation.read_text()))
        except (OSError, ValueError):
            pass  # an unreadable generation config: the model's own ids stand
    for source in sources:
        eos = source.get("eos_token_id")
        for i in eos if isinstance(eos, list) else [] if eos is None else [eos]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids or None
