"""Gemma 4's vision encoder (`gemma4_vision`) and its multimodal embedder, on MLX.

Reference: transformers 5.23's `Gemma4VisionModel` and `Gemma4MultimodalEmbedder`. Pixels in
[0, 1] arrive as flattened patches with their (x, y) grid positions (the image processor's
`pixel_values` / `image_position_ids`); padding patches (position -1) are dropped before
encoding, which changes nothing for the real ones: transformers masks them out as keys and
zeroes them before pooling. One image is encoded at a time (sizes differ).
"""

import math
from dataclasses import dataclass, field
from typing import Dict, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import BaseModelArgs
from mlx_lm.models.gemma4_text import RMSNormNoScale


@dataclass
class VisionArgs(BaseModelArgs):
    """A `gemma4_vision` config (transformers' `Gemma4VisionConfig` defaults)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    rms_norm_eps: float = 1e-6
    patch_size: int = 16
    pooling_kernel_size: int = 3
    position_embedding_size: int = 10 * 1024
    use_clipped_linears: bool = False
    standardize: bool = False
    rope_parameters: Dict = field(default_factory=lambda: {"rope_type": "axial", "rope_theta": 100.0})


class ClippableLinear(nn.Module):
    """A bias-free linear whose input and output may be clamped (`use_clipped_linears`)."""

    def __init__(self, args: VisionArgs, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.clipped = args.use_clipped_linears
        if self.clipped:
            self.input_min, self.input_max = mx.array(-math.inf), mx.array(math.inf)
            self.output_min, self.output_max = mx.array(-math.inf), mx.array(math.inf)

    def __call__(self, x: mx.array) -> mx.array:
        if not self.clipped:
            return self.linear(x)
        x = mx.clip(x, self.input_min, self.input_max)
        return mx.clip(self.linear(x), self.output_min, self.output_max)


def rotate_halves(x: mx.array) -> mx.array:
    """rotate_half applied to each half of the last axis: [a, b, c, d] -> [-b, a, -d, c]."""
    a, b, c, d = mx.split(x, 4, axis=-1)
    return mx.concatenate([-b, a, -d, c], axis=-1)


def axial_rope(args: VisionArgs, positions: mx.array):
    """cos, sin [N, head_dim] of axial 2D RoPE: the first half of each head rotates with
    the patch's x, the second half with its y (the same frequencies, theta 100)."""
    spatial = args.head_dim // 2
    theta = args.rope_parameters.get("rope_theta", 100.0)
    inv_freq = 1.0 / (theta ** (mx.arange(0, spatial, 2, dtype=mx.float32) / spatial))  # [head_dim / 4]
    angles = positions.astype(mx.float32)[..., None] * inv_freq  # [N, 2, head_dim / 4]
    x, y = angles[:, 0], angles[:, 1]
    angles = mx.concatenate([x, x, y, y], axis=-1)  # [N, head_dim]
    return mx.cos(angles), mx.sin(angles)


class VisionAttention(nn.Module):
    """Bidirectional attention with Q/K norms, a scale-free V norm, axial RoPE, scale 1."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.q_proj = ClippableLinear(args, args.hidden_size, self.heads * self.head_dim)
        self.k_proj = ClippableLinear(args, args.hidden_size, self.kv_heads * self.head_dim)
        self.v_proj = ClippableLinear(args, args.hidden_size, self.kv_heads * self.head_dim)
        self.o_proj = ClippableLinear(args, self.heads * self.head_dim, args.hidden_size)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.v_norm = RMSNormNoScale(self.head_dim, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        B, N, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, N, self.heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).reshape(B, N, self.kv_heads, self.head_dim))
        v = self.v_norm(self.v_proj(x).reshape(B, N, self.kv_heads, self.head_dim))
        cos, sin = cos[:, None].astype(x.dtype), sin[:, None].astype(x.dtype)  # [N, 1, head_dim]
        q = q * cos + rotate_halves(q) * sin
        k = k * cos + rotate_halves(k) * sin
        # [B, heads, N, head_dim]
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, N, -1))


class VisionMLP(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.gate_proj = ClippableLinear(args, args.hidden_size, args.intermediate_size)
        self.up_proj = ClippableLinear(args, args.hidden_size, args.intermediate_size)
        self.down_proj = ClippableLinear(args, args.intermediate_size, args.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class VisionLayer(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.self_attn = VisionAttention(args)
        self.mlp = VisionMLP(args)
        norm = lambda: nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class VisionEncoder(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.layers = [VisionLayer(args) for _ in range(args.num_hidden_layers)]


class PatchEmbedder(nn.Module):
    """Patches -> hidden: a linear of `2 (pixels - 0.5)` plus the learned x and y rows."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.input_proj = nn.Linear(3 * args.patch_size**2, args.hidden_size, bias=False)
        self.position_embedding_table = mx.zeros((2, args.position_embedding_size, args.hidden_size))

    def __call__(self, pixels: mx.array, positions: mx.array) -> mx.array:
        hidden = self.input_proj((2 * (pixels - 0.5)).astype(self.input_proj.weight.dtype))
        table = self.position_embedding_table
        return hidden + table[0][positions[:, 0]] + table[1][positions[:, 1]]


class VisionModel(nn.Module):
    """Patches -> pooled soft tokens (`Gemma4VisionModel`), before the embedder."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        self.patch_embedder = PatchEmbedder(args)
        self.encoder = VisionEncoder(args)
        if args.standardize:
            self.std_bias = mx.zeros((args.hidden_size,))
            self.std_scale = mx.ones((args.hidden_size,))

    def __call__(self, pixels: mx.array, positions: mx.array) -> mx.array:
        """pixels [N, 3 p^2] in [0, 1], positions [N, 2] (x, y) of real patches -> [N / k^2, hidden]."""
        if positions.shape[0] and int(positions.max()) >= self.args.position_embedding_size:
            raise ValueError(f"the image is {int(positions.max()) + 1} patches across, more than the "
                             f"encoder's {self.args.position_embedding_size}: resize it smaller")
        hidden = self.patch_embedder(pixels, positions)[None]  # [1, N, hidden]
        cos, sin = axial_rope(self.args, positions)
        for layer in self.encoder.layers:
            hidden = layer(hidden, cos, sin)
        pooled = self.pool(hidden[0], positions) * math.sqrt(self.args.hidden_size)
        if self.args.standardize:
            pooled = (pooled - self.std_bias.astype(mx.float32)) * self.std_scale.astype(mx.float32)
        return pooled.astype(hidden.dtype)

    def pool(self, hidden: mx.array, positions: mx.array) -> mx.array:
        """Average each k x k block of patches (float32): [N, hidden] -> [N / k^2, hidden],
        soft tokens in row-major order of the pooled grid."""
        k = self.args.pooling_kernel_size
        count = hidden.shape[0] // (k * k)
        if count * k * k != hidden.shape[0]:
            raise ValueError(f"{hidden.shape[0]} patches do not pool into {k} x {k} blocks")
        width = (int(positions[:, 0].max()) + 1) // k  # pooled grid columns
        block = positions[:, 0] // k + width * (positions[:, 1] // k)  # [N]
        weights = (block[None] == mx.arange(count)[:, None]).astype(mx.float32) / (k * k)  # [N / k^2, N]
        return weights @ hidden.astype(mx.float32)


class MultimodalEmbedder(nn.Module):
    """Soft tokens -> the text width: a norm without scale, then a linear."""

    def __init__(self, in_features: int, text_hidden_size: int, eps: float):
        super().__init__()
        self.embedding_pre_projection_norm = RMSNormNoScale(in_features, eps=eps)
        self.embedding_projection = nn.Linear(in_features, text_hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.embedding_projection(self.embedding_pre_projection_norm(x))


class ImageEncoder(nn.Module):
    """The vision tower and its embedder, named as the checkpoint names them (without the
    leading `model.`): one image's patches -> its soft tokens in the text width."""

    def __init__(self, args: VisionArgs, text_hidden_size: int):
        super().__init__()
        self.args = args
        self.vision_tower = VisionModel(args)
        self.embed_vision = MultimodalEmbedder(args.hidden_size, text_hidden_size, args.rms_norm_eps)

    def __call__(self, pixel_values: np.ndarray, position_ids: np.ndarray) -> mx.array:
        """pixel_values [P, 3 p^2], position_ids [P, 2] (padding rows -1) of one image, as
        the image processor gives them -> [soft tokens, text hidden]."""
        real = ~(np.asarray(position_ids) == -1).all(axis=-1)
        pixels = mx.array(np.asarray(pixel_values)[real], dtype=mx.float32)
        positions = mx.array(np.asarray(position_ids)[real], dtype=mx.int32)
        return self.embed_vision(self.vision_tower(pixels, positions))


VISION_PREFIXES = ("vision_tower.", "embed_vision.")


def load_image_encoder(config: Dict, weights: Dict[str, mx.array]) -> Optional[ImageEncoder]:
    """The image encoder of a multimodal config (None without a `vision_config`), its
    weights taken from `weights` (HF `model.vision_tower.*` / `model.embed_vision.*`, or
    mlx-vlm's names without `model.`)."""
    vision_config = config.get("vision_config")
    if not vision_config:
        return None
    text_hidden = (config.get("text_config") or {})["hidden_size"]
    encoder = ImageEncoder(VisionArgs.from_dict(vision_config), text_hidden)
    ours = {}
    for name, value in weights.items():
        name = name.removeprefix("model.")
        if name.startswith(VISION_PREFIXES):
            ours[name] = value
    encoder.load_weights(list(ours.items()), strict=True)
    encoder.eval()
    return encoder
