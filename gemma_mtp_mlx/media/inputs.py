"""Images as the caller gives them (file paths, bytes, PIL images, numpy arrays) -> what
the encoder reads, through transformers' own Gemma 4 image processor."""

import io
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

import numpy as np

# Larger images are refused before decoding (a decompression bomb stays compressed);
# the processor scales every image down to its soft-token budget anyway.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024


@dataclass
class ProcessedImage:
    pixel_values: np.ndarray  # [max patches, 3 p^2] in [0, 1], padding rows after the real ones
    position_ids: np.ndarray  # [max patches, 2]: each patch's (x, y); padding (-1, -1)
    num_soft_tokens: int


def read_image(image, index: int = 0):
    """One image as an RGB PIL image; anything unreadable or too large is a ValueError
    naming image `index`."""
    from PIL import Image, UnidentifiedImageError

    what = f"image {index}"
    if isinstance(image, np.ndarray):
        return _from_array(image, what)
    if isinstance(image, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(image))
    elif isinstance(image, (str, Path)):
        source, what = Path(image).expanduser(), f"image {index} ({image})"
        if not source.is_file():
            raise ValueError(f"{what} is not a file: give an image file's path")
    elif isinstance(image, Image.Image):
        _check_size(image.width, image.height, what)
        return image.convert("RGB")
    else:
        raise ValueError(f"{what} is a {type(image).__name__}: give a file path, bytes, a PIL image or a numpy array")
    try:
        with Image.open(source) as opened:
            _check_size(opened.width, opened.height, what)
            return opened.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{what} could not be read as an image ({type(e).__name__}: {e})") from e


def _check_size(width: int, height: int, what: str) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"{what} has {width} x {height} pixels, more than {MAX_IMAGE_PIXELS}: scale it down first")
    if not width or not height:
        raise ValueError(f"{what} is empty ({width} x {height} pixels)")


def _from_array(array: np.ndarray, what: str):
    """[H, W] or [H, W, 1|3|4] uint8 (0-255), or float in [0, 1] (rounded to 8 bits)."""
    from PIL import Image

    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ValueError(f"{what} is an array of shape {array.shape}: give [height, width] or "
                         "[height, width, channels] with 1, 3 or 4 channels")
    _check_size(array.shape[1], array.shape[0], what)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError(f"{what} is a float array outside [0, 1]: give values in [0, 1] or uint8")
        array = np.round(array * 255)
    elif array.dtype != np.uint8:
        raise ValueError(f"{what} is a {array.dtype} array: give uint8 (0-255) or floats in [0, 1]")
    array = array.astype(np.uint8)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    return Image.fromarray(array).convert("RGB")


class ImageProcessor:
    """transformers' Gemma 4 image processor (aspect-preserving resize to the soft-token
    budget, patches, positions), loaded from the checkpoint."""

    def __init__(self, processor):
        self.processor = processor

    @classmethod
    def load(cls, path: Path, vision_config: dict) -> "ImageProcessor":
        """The checkpoint's own processor config, else transformers' defaults with the
        encoder's patch and pooling sizes."""
        from transformers import AutoImageProcessor, Gemma4ImageProcessorPil

        try:
            return cls(AutoImageProcessor.from_pretrained(path))
        except (OSError, ValueError):
            return cls(Gemma4ImageProcessorPil(patch_size=vision_config.get("patch_size", 16),
                                               pooling_kernel_size=vision_config.get("pooling_kernel_size", 3)))

    def __call__(self, images: Sequence) -> List[ProcessedImage]:
        if not isinstance(images, (list, tuple)):
            raise ValueError(f"images must be a list (one image per image placeholder), not a {type(images).__name__}")
        pictures = [read_image(image, i) for i, image in enumerate(images)]
        if not pictures:
            return []
        out = self.processor(images=pictures, return_tensors="np")
        return [ProcessedImage(out["pixel_values"][i], out["image_position_ids"][i], int(n))
                for i, n in enumerate(out["num_soft_tokens_per_image"])]
