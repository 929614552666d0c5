"""Start images for image-to-video: reading a picture file safely, and what is wrong with a picture that will
make a poor first frame (too small, or far from the video's shape)."""
from __future__ import annotations

import os
import re
import struct
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageOps

if TYPE_CHECKING:
    import torch

__all__ = [
    "MAX_ASPECT_MISMATCH", "MAX_IMAGE_PIXELS", "MIN_IMAGE_SIDE", "open_image", "prepare_image", "start_image_warnings",
]

# 8192 x 8192 (67 MP): far more than any start image needs (768p is 1 MP; it is resized to the video size),
# and below PIL's own decompression-bomb limit, so this module decides, with one message.
MAX_IMAGE_PIXELS = 8192 * 8192
MIN_IMAGE_SIDE = 8  # pixels: below this on a side a start image carries (almost) no picture
MAX_ASPECT_MISMATCH = 4.0  # image aspect vs video aspect: beyond this, cover-and-crop cuts away most of it

_USE = "use a PNG, JPEG or WebP picture"
# the errors PIL raises for a file it cannot identify or decode (UnidentifiedImageError is an OSError)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, struct.error)


def open_image(path: str | os.PathLike, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Read a start image file as an RGB PIL image (EXIF rotation applied, first frame of an animation).

    FileNotFoundError when `path` does not exist; ValueError naming the fix when it is a folder, not a picture
    PIL can read, or larger than `max_pixels` (checked from the header, before any pixel is decoded; PIL's own
    decompression-bomb warning and error never reach the caller).
    """
    source = Path(path).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"start image not found: {source}")
    if source.is_dir():
        raise ValueError(f"cannot read start image {source}: it is a folder; {_USE}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # judged against max_pixels below
            image = Image.open(source)
    except Image.DecompressionBombError as exc:
        raise _too_large(source, exc, max_pixels) from None
    except PermissionError:
        raise
    except _DECODE_ERRORS as exc:
        raise _unreadable(source, exc) from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ValueError(
                f"start image {source} is {width} x {height} = {width * height:,} pixels, more than the limit of "
                f"{max_pixels:,}; scale it down first (it is resized to the video size anyway)"
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                return ImageOps.exif_transpose(image).convert("RGB")  # decodes the pixels
        except Image.DecompressionBombError as exc:
            raise _too_large(source, exc, max_pixels) from None
        except _DECODE_ERRORS as exc:
            raise _unreadable(source, exc) from None


def _unreadable(source: Path, exc: BaseException) -> ValueError:
    return ValueError(f"cannot read start image {source} ({type(exc).__name__}: {exc}); {_USE}")


def _too_large(source: Path, exc: Exception, max_pixels: int) -> ValueError:
    """Our message for PIL's DecompressionBombError: its size and the limit it broke (PIL's, if lower)."""
    text = str(exc)
    size = re.search(r"\((\d+) pixels\)", text)
    limit = re.search(r"limit of (\d+) pixels", text)
    pixels = f"{int(size.group(1)):,} pixels" if size else "too many pixels"
    bound = min(max_pixels, int(limit.group(1))) if limit else max_pixels
    return ValueError(
        f"start image {source} is {pixels}, more than the limit of {bound:,}; scale it down first "
        "(it is resized to the video size anyway)"
    )


def start_image_warnings(
    width: int, height: int, target_width: int | None = None, target_height: int | None = None
) -> list[str]:
    """Why a `width` x `height` start image will make a poor first frame of a `target_width` x `target_height`
    video (default: the image's own size); [] when it is fine.

    The image is scaled to cover the video and centre-cropped, so a tiny image (under `MIN_IMAGE_SIDE` pixels on
    a side) is blown up into a smear, and one whose aspect ratio is more than `MAX_ASPECT_MISMATCH` times the
    video's loses most of its width or height to the crop.
    """
    sizes = {"width": width, "height": height, "target_width": target_width, "target_height": target_height}
    for name, value in sizes.items():
        if value is None and name.startswith("target_"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    target_width = target_width or width
    target_height = target_height or height
    found = []
    if min(width, height) < MIN_IMAGE_SIDE:
        found.append(
            f"the start image is only {width} x {height} pixels (under {MIN_IMAGE_SIDE} on a side): scaled up to "
            f"{target_width} x {target_height} it gives a flat, blurred first frame; use a real picture"
        )
    ratio = (width / height) / (target_width / target_height)
    mismatch = max(ratio, 1 / ratio)
    if mismatch > MAX_ASPECT_MISMATCH:
        side, shape = ("width", "wider") if ratio > 1 else ("height", "taller")
        found.append(
            f"the start image is {width} x {height}, {mismatch:.1f} times {shape} in shape "
            f"than the {target_width} x {target_height} video: scaled to cover it and centre-cropped, only the middle "
            f"{1 / mismatch:.0%} of its {side} is kept; crop it yourself or choose a video size closer to its shape"
        )
    return found


def prepare_image(image: Any, width: int | None, height: int | None) -> tuple[torch.Tensor, int, int]:
    """An i2v start image -> ([1,3,1,H,W] float in [-1,1], width, height).

    Accepts a PIL image, a uint8 array [H,W,3], or a float tensor/array [H,W,3] (or [1,H,W,3]) in [0,1].
    Policy when the image size differs from width x height: scale to cover, then centre-crop (LANCZOS),
    as the official demo does. Without width/height the image's own size is used.
    """
    import numpy as np
    import torch

    from .validation import check_resolution

    if isinstance(image, Image.Image):
        pil = image.convert("RGB")
    else:
        array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        if array.ndim == 4 and array.shape[0] == 1:
            array = array[0]
        if array.ndim != 3 or array.shape[-1] not in (3, 4):
            raise ValueError(f"input image must be [H, W, 3] (RGB); got shape {array.shape}")
        if array.dtype != np.uint8:
            array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
        pil = Image.fromarray(array[..., :3], "RGB")
    width = width or pil.width
    height = height or pil.height
    check_resolution(width, height)
    for message in start_image_warnings(pil.width, pil.height, width, height):
        warnings.warn(message, stacklevel=3)
    if pil.size != (width, height):
        scale = max(width / pil.width, height / pil.height)
        resized = pil.resize((max(width, round(pil.width * scale)), max(height, round(pil.height * scale))), Image.LANCZOS)
        left, top = (resized.width - width) // 2, (resized.height - height) // 2
        pil = resized.crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).float().div(255.0)
    pixels = (pixels - 0.5) / 0.5
    return pixels.permute(2, 0, 1)[None, :, None], width, height
