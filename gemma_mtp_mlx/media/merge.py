"""Images in the target's prefill, as transformers' `Gemma4Model` merges them.

Each image placeholder in the prompt becomes `<|image>` + n soft-token ids + `<image|>`.
Before embedding, the soft-token ids become the pad id (so the per-layer inputs of E2B/E4B
see the pad token there); the scaled text embeddings at those positions are replaced by
the image's soft tokens (not scaled by sqrt(width)), with a count check. mlx-lm's
`gemma4_text` scales whatever embeddings it is given by sqrt(width), so the soft tokens go
in divided by it. Where the config says `use_bidirectional_attention: "vision"`, the
sliding layers let each image's soft tokens see each other both ways ((causal OR same
image) AND the window), also after cached context; full-attention layers stay causal.
A prefill chunk never ends inside an image, so an image is always seen whole.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from ..cache import SlidingKVCache


@dataclass
class MediaChunk:
    """The images of one prefill chunk."""

    is_media: np.ndarray  # [L] bool: the chunk's soft-token positions
    features: mx.array  # [is_media.sum(), hidden]: their soft tokens, in order
    block_ids: Optional[np.ndarray]  # [L]: each position's image (-1: text); None: causal attention


@dataclass
class MediaPrompt:
    """A prompt's soft tokens and where they go."""

    features: mx.array  # [M, hidden]: every image's soft tokens, in prompt order
    blocks: List[Tuple[int, int]]  # each image's soft-token positions [start, end), in order
    bidirectional: bool = False  # images attend within themselves both ways (sliding layers)
    encoder_seconds: float = 0.0

    def __post_init__(self):
        total = sum(end - start for start, end in self.blocks)
        if total != self.features.shape[0]:
            raise ValueError(f"the prompt has {total} image soft-token positions but the images gave "
                             f"{self.features.shape[0]} soft tokens")

    @property
    def num_tokens(self) -> int:
        return self.features.shape[0]

    def chunk_end(self, start: int, end: int) -> int:
        """`end`, moved so that the chunk [start, end) does not cut an image in two: back
        to the image's start, or (an image longer than the chunk) past its end."""
        for first, last in self.blocks:
            if first < end < last:
                return first if first > start else last
        return end

    def chunk(self, start: int, end: int) -> Optional[MediaChunk]:
        """The images inside [start, end) (None if there are none)."""
        is_media = np.zeros(end - start, dtype=bool)
        block_ids = np.full(end - start, -1, dtype=np.int32)
        taken = 0  # soft tokens before the chunk
        rows = []
        for i, (first, last) in enumerate(self.blocks):
            if last <= start or first >= end:
                taken += (last - first) * (last <= start)
                continue
            if first < start or last > end:
                raise ValueError(f"prefill chunk [{start}, {end}) cuts image {i} at [{first}, {last})")
            is_media[first - start : last - start] = True
            block_ids[first - start : last - start] = i
            rows.append((taken, taken + last - first))
            taken += last - first
        if not rows:
            return None
        features = mx.concatenate([self.features[a:b] for a, b in rows])
        return MediaChunk(is_media, features, block_ids if self.bidirectional else None)


def merge_embeddings(embeddings: mx.array, is_media: np.ndarray, features: mx.array) -> mx.array:
    """embeddings [1, L, hidden] with the positions `is_media` [L] replaced, in order, by
    `features` [n, hidden]; n must be the number of those positions."""
    count = int(is_media.sum())
    if count != features.shape[0]:
        raise ValueError(f"{count} image token positions but {features.shape[0]} image soft tokens: "
                         "each image placeholder must hold exactly its image's soft tokens")
    if not count:
        return embeddings
    index = mx.array(np.maximum(np.cumsum(is_media) - 1, 0), dtype=mx.int32)  # [L]: each position's row
    return mx.where(mx.array(is_media)[None, :, None], features.astype(embeddings.dtype)[index][None], embeddings)


def forward_with_media(target, tokens: mx.array, cache: List, chunk: MediaChunk, pad_token_id: int):
    """`Target.__call__` for a prefill chunk holding images: (logits [1, L, vocab], final-norm
    hidden [1, L, hidden])."""
    backbone = target.backbone
    ids = mx.where(mx.array(chunk.is_media)[None], pad_token_id, tokens)  # [1, L]
    embeddings = merge_embeddings(backbone.embed_tokens(ids), chunk.is_media, chunk.features / backbone.embed_scale)
    if chunk.block_ids is not None:
        sliding = [t == "sliding_attention" for t in target.args.layer_types[: len(cache)]]
        cache = [ImageBlockCache(c, chunk.block_ids, target.args.sliding_window) if s else c
                 for c, s in zip(cache, sliding)]
    hidden = backbone(ids, cache=cache, input_embeddings=embeddings)
    return target.logits(hidden), hidden


class ImageBlockCache:
    """A sliding layer's cache seen through one prefill chunk whose images attend within
    themselves both ways: writes go to the cache; the mask is (causal OR same image) AND
    the window, over the keys the write returns."""

    def __init__(self, cache, block_ids: np.ndarray, window: int):
        if type(cache) not in (SlidingKVCache, KVCache):
            raise ValueError(f"images with bidirectional attention need the target's own caches, not {type(cache)}")
        self.cache, self.block_ids, self.window = cache, block_ids, window

    def __getattr__(self, name):
        return getattr(self.cache, name)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        return self.cache.update_and_fetch(keys, values)

    def make_mask(self, N: int, window_size: Optional[int] = None, return_array: bool = False) -> mx.array:
        c = self.cache
        earlier = c._kept_before_write(N) if isinstance(c, SlidingKVCache) else c.offset  # keys before the chunk
        return image_block_mask(c.offset, earlier, self.block_ids, window_size or self.window)


def image_block_mask(offset: int, earlier: int, block_ids: Sequence[int], window: int) -> mx.array:
    """[L, earlier + L] boolean: L queries from position `offset` over keys from position
    `offset - earlier`; a query sees a key that is not after it or is in its image, and
    that is less than `window` positions before it."""
    block_ids = np.asarray(block_ids)
    queries = np.arange(offset, offset + len(block_ids))[:, None]
    keys = np.arange(offset - earlier, offset + len(block_ids))[None]
    key_blocks = np.concatenate([np.full(earlier, -1), block_ids])[None]
    same_image = (block_ids[:, None] == key_blocks) & (block_ids[:, None] >= 0)
    return mx.array(((keys <= queries) | same_image) & (queries - keys < window))
