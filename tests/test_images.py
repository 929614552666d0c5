"""Start images: reading files (formats, EXIF rotation, bad and huge files) and warnings about poor pictures."""
from __future__ import annotations

import re
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pyramid_core.images import MAX_IMAGE_PIXELS, open_image, start_image_warnings

_USE = "use a PNG, JPEG or WebP picture"


def _pixels(width: int = 12, height: int = 10, channels: int = 3) -> np.ndarray:
    return np.arange(height * width * channels, dtype=np.uint8).reshape(height, width, channels)


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims `width` x `height` (no pixel data): what a decompression bomb looks like to open."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def _no_warnings(action):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = action()
    assert [str(w.message) for w in caught] == []
    return result


# ---------------------------------------------------------------------------------------------- open_image


@pytest.mark.parametrize("mode, suffix", [("RGB", ".png"), ("RGBA", ".png"), ("RGB", ".webp")])
def test_lossless_pictures_read_as_exact_rgb(tmp_path, mode, suffix):
    pixels = _pixels(channels=len(mode))
    path = tmp_path / f"start{suffix}"
    Image.fromarray(pixels, mode).save(path, **({"lossless": True} if suffix == ".webp" else {}))
    image = _no_warnings(lambda: open_image(path))
    assert image.mode == "RGB" and image.size == (12, 10)
    assert np.array_equal(np.asarray(image), pixels[..., :3])  # alpha dropped, colours kept


def test_grey_and_palette_pictures_become_rgb(tmp_path):
    grey = np.arange(120, dtype=np.uint8).reshape(10, 12)
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    assert np.array_equal(np.asarray(open_image(tmp_path / "grey.png")), np.repeat(grey[..., None], 3, axis=2))
    palette = Image.fromarray(_pixels()).quantize(colors=16)
    palette.save(tmp_path / "palette.png")
    assert np.array_equal(np.asarray(open_image(tmp_path / "palette.png")), np.asarray(palette.convert("RGB")))


def test_exif_rotation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": what phones write for portrait shots
    Image.fromarray(_pixels(40, 24)).save(tmp_path / "phone.jpg", exif=exif)
    assert open_image(tmp_path / "phone.jpg").size == (24, 40)
    Image.fromarray(_pixels(40, 24)).save(tmp_path / "plain.jpg")
    assert open_image(tmp_path / "plain.jpg").size == (40, 24)


def test_missing_file_and_folder_are_named(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match=f"^start image not found: {re.escape(str(missing))}$"):
        open_image(missing)
    with pytest.raises(ValueError, match=f"^cannot read start image {re.escape(str(tmp_path))}: it is a folder; {_USE}$"):
        open_image(tmp_path)


def test_files_that_are_not_pictures_are_explained(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(ValueError, match=rf"^cannot read start image {re.escape(str(text))} \(UnidentifiedImageError: .*\); {_USE}$"):
        open_image(text)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"cannot read start image .*empty\.jpg .*; {_USE}$"):
        open_image(empty)
    # a cut-off download: the header reads, the pixels do not
    whole = tmp_path / "whole.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(whole)
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"cannot read start image .*cut\.png \(OSError: .*truncated.*\); {_USE}$"):
        open_image(cut)


def test_limit_is_8192_squared_and_checked_before_decoding(tmp_path):
    assert MAX_IMAGE_PIXELS == 8192 * 8192 == 67_108_864
    # under PIL's own warning limit (89,478,485) but over ours: the header alone decides, no pixel data needed
    path = _png_header_only(tmp_path / "big.png", 9000, 9000)
    with pytest.raises(ValueError, match=r"big\.png is 9000 x 9000 = 81,000,000 pixels, more than the limit of "
                                         r"67,108,864; scale it down first"):
        _no_warnings(lambda: open_image(path))
    assert _png_header_only(tmp_path / "fits.png", 8192, 8192).stat().st_size < 100  # fits: fails only on pixels
    with pytest.raises(ValueError, match=r"cannot read start image .*fits\.png"):
        open_image(tmp_path / "fits.png")


@pytest.mark.parametrize("side, pixels", [(9500, "9500 x 9500 = 90,250,000 pixels"), (20000, "400,000,000 pixels")])
def test_pil_decompression_bomb_becomes_our_message(tmp_path, side, pixels):
    # 9500^2: PIL's DecompressionBombWarning range; 20000^2: its DecompressionBombError range. Neither leaks.
    path = _png_header_only(tmp_path / "bomb.png", side, side)
    with pytest.raises(ValueError, match=rf"^start image {re.escape(str(path))} is {pixels}, more than the limit of "
                                         r"67,108,864; scale it down first \(it is resized to the video size anyway\)$"):
        _no_warnings(lambda: open_image(path))


def test_a_lower_limit_is_reported_as_such(tmp_path, monkeypatch):
    path = tmp_path / "small.png"
    Image.fromarray(_pixels()).save(path)  # 12 x 10 = 120 pixels
    with pytest.raises(ValueError, match=r"is 12 x 10 = 120 pixels, more than the limit of 100;"):
        open_image(path, max_pixels=100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # someone lowered PIL's global: its error (> 100) is ours
    with pytest.raises(ValueError, match=r"is 120 pixels, more than the limit of 100;"):
        _no_warnings(lambda: open_image(path))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL only warns (120 > 100): hidden, the image reads
    assert _no_warnings(lambda: open_image(path)).size == (12, 10)


# ------------------------------------------------------------------------------------- start_image_warnings


def test_good_start_images_give_no_warning():
    assert start_image_warnings(640, 384, 640, 384) == []
    assert start_image_warnings(96, 80, 640, 384) == []  # small and a bit squarer: scaled and cropped, fine
    assert start_image_warnings(8, 8, 640, 384) == []
    assert start_image_warnings(2560, 384, 640, 384) == []  # exactly 4 times wider in shape: the limit itself
    assert start_image_warnings(4000, 500) == []  # no target: the image's own size


def test_tiny_start_image_is_reported():
    assert start_image_warnings(1, 1, 640, 384) == [
        "the start image is only 1 x 1 pixels (under 8 on a side): scaled up to 640 x 384 it gives a flat, blurred "
        "first frame; use a real picture"
    ]
    assert start_image_warnings(7, 64, 640, 384)[0].startswith("the start image is only 7 x 64 pixels")


def test_extreme_aspect_ratio_is_reported():
    # 4000/500 = 8 vs 640/384 = 1.67: 4.8 times wider, so 1/4.8 = 21% of its width survives the crop
    assert start_image_warnings(4000, 500, 640, 384) == [
        "the start image is 4000 x 500, 4.8 times wider in shape than the 640 x 384 video: scaled to cover it and "
        "centre-cropped, only the middle 21% of its width is kept; crop it yourself or choose a video size closer "
        "to its shape"
    ]
    (tall,) = start_image_warnings(384, 1600, 640, 384)  # 0.24 vs 1.67: 6.9 times taller, 14% of the height kept
    assert "6.9 times taller" in tall and "only the middle 14% of its height is kept" in tall
    assert len(start_image_warnings(1, 600, 640, 384)) == 2  # tiny and extreme


@pytest.mark.parametrize("args", [(0, 10), (10, -1), (10, 10, 0, 384), (10.5, 10), (True, 10), (None, 10)])
def test_bad_sizes_are_refused(args):
    with pytest.raises(ValueError, match="must be a positive integer"):
        start_image_warnings(*args)
