"""A target's image modality: its encoder, its processor and its image token ids; a
prompt with image placeholders and the images -> the expanded prompt and its soft tokens."""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx

from .inputs import ImageProcessor
from .merge import MediaPrompt
from .vision import ImageEncoder, load_image_encoder


@dataclass
class Vision:
    encoder: ImageEncoder
    processor: ImageProcessor
    image_token_id: int
    boi_token_id: int
    eoi_token_id: int
    bidirectional: bool  # use_bidirectional_attention == "vision"

    def prepare(self, prompt: List[int], images: Sequence) -> Tuple[List[int], MediaPrompt]:
        """(the prompt with each image placeholder expanded to its soft tokens, the images'
        soft tokens and where they go)."""
        tic = time.perf_counter()
        processed = self.processor(images)
        ids, blocks = expand_image_placeholders(prompt, [p.num_soft_tokens for p in processed], self.image_token_id,
                                                self.boi_token_id, self.eoi_token_id)
        features = [self.encoder(p.pixel_values, p.position_ids) for p in processed]
        features = mx.concatenate(features) if features else mx.zeros((0, 1))
        mx.eval(features)
        return ids, MediaPrompt(features, blocks, self.bidirectional, time.perf_counter() - tic)


def expand_image_placeholders(prompt: List[int], counts: List[int], image_id: int, boi_id: int,
                              eoi_id: int) -> Tuple[List[int], List[Tuple[int, int]]]:
    """Each image placeholder of `prompt` -> `<|image>` + counts[i] image ids + `<image|>`,
    as transformers' processor expands the image token: (the ids, each image's soft-token
    span [start, end)). A run of image ids right after `<|image>` is an image already
    expanded and must hold exactly its count; placeholders and images must match in number."""
    ids, blocks = [], []
    i = 0
    while i < len(prompt):
        if prompt[i] != image_id:
            ids.append(prompt[i])
            i += 1
            continue
        run = next((j for j in range(i, len(prompt)) if prompt[j] != image_id), len(prompt)) - i
        expanded = bool(ids) and ids[-1] == boi_id
        for n in [run] if expanded else [1] * run:
            image = len(blocks)
            if image >= len(counts):
                raise ValueError(f"the prompt has more image placeholders than the {len(counts)} images given: "
                                 "give one image per placeholder")
            if expanded and n != counts[image]:
                raise ValueError(f"image {image} has {counts[image]} soft tokens but its expanded placeholder "
                                 f"holds {n} image tokens")
            ids.extend([] if expanded else [boi_id])
            blocks.append((len(ids), len(ids) + counts[image]))
            ids.extend([image_id] * counts[image] + ([] if expanded else [eoi_id]))
        i += run
    if len(blocks) != len(counts):
        raise ValueError(f"the prompt has {len(blocks)} image placeholders but {len(counts)} images were given: "
                         "put one image token in the prompt per image")
    return ids, blocks


def load_vision(path: Path, config: Dict, weights: Dict[str, mx.array]) -> Optional[Vision]:
    """The image modality of a multimodal checkpoint (None if it has no vision tower)."""
    encoder = load_image_encoder(config, weights)
    if encoder is None:
        return None
    text_config = config.get("text_config") or {}
    return Vision(
        encoder,
        ImageProcessor.load(path, config["vision_config"]),
        image_token_id=config.get("image_token_id", 258_880),
        boi_token_id=config.get("boi_token_id", 255_999),
        eoi_token_id=config.get("eoi_token_id", 258_882),
        bidirectional=text_config.get("use_bidirectional_attention") == "vision",
    )
