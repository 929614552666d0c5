"""Video file writers (PyAV): mp4 (H.264), webm (VP9), animated webp and gif.

Frames stream in as chunks, are encoded to a temporary file next to the target and renamed into
place at the end (``outputs.write_atomically``), so a failed or cancelled write never leaves a partial
file and an existing file is never overwritten (unless asked). Disk-full, permission and encoder
failures raise :class:`~pyramid_core.outputs.WriteError` naming the path, the reason and the fix.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Union

import numpy as np
import torch

from . import settings
from .outputs import WriteError, as_write_error, check_writable, output_path, publish, reserve_temp, write_atomically

__all__ = [
    "VIDEO_FORMATS", "FrameSource", "VideoSink", "WriteError", "check_writable", "read_video", "write_image",
    "write_video",
]

logger = logging.getLogger(__name__)

VIDEO_FORMATS = settings.VIDEO_FORMATS

FrameArray = Union[np.ndarray, torch.Tensor]
FrameSource = Union[FrameArray, Iterable[FrameArray]]

# Encoder used through PyAV for each format; webp/gif fall back to Pillow when it is missing.
_PYAV_ENCODER = {"mp4": "libx264", "webm": "libvpx-vp9", "webp": "libwebp_anim", "gif": "gif"}


def write_video(
    frames: FrameSource,
    path: str | os.PathLike,
    *,
    fps: float = 24,
    format: str | None = None,
    quality: int = 80,
    overwrite: bool = False,
    callback: Callable[[int], None] | None = None,
    metadata: Mapping[str, object] | None = None,
) -> Path:
    """Encode RGB frames to ``path`` and return the path actually written.

    ``frames``: uint8 ``[F,H,W,3]`` (numpy or torch; float in [0, 1] is converted), or an iterable of
    such chunks (``[H,W,3]`` single frames allowed) so a video never needs to be in memory at once.
    ``format``: ``mp4`` | ``webm`` | ``webp`` | ``gif``; ``None`` takes it from the suffix (given a format,
    a missing suffix is appended). ``quality`` 0-100 (higher = better, larger): mp4 CRF ``51 - 0.4q``,
    webm CRF ``63 - 0.45q``, webp quality ``q``; gif ignores it (per-frame 256-colour palettes).
    mp4 needs even sizes (yuv420p), so odd widths/heights are padded by repeating the last column/row.
    An existing file is kept: the name gets a counter, ``clip.mp4`` -> ``clip_00001.mp4``, ``clip_00002.mp4``...
    (``overwrite=True`` replaces it). The folder must exist. ``callback(n)`` runs after each encoded frame;
    an exception from it (or from ``frames``) cancels the write and leaves no file behind. OS and encoder
    failures (disk full, permissions, read-only disk) raise :class:`WriteError`, e.g. ``cannot write /x/out.mp4:
    no space left on device; free some space or choose another output folder``, with the original as ``__cause__``.
    ``metadata``: container tags (mp4 and webm; webp and gif carry none), e.g. ComfyUI's ``prompt`` and
    ``workflow``: strings as they are, other values as JSON, as ComfyUI's SaveVideo writes them (mp4 with
    ``movflags use_metadata_tags``, so any key survives).
    """
    target, fmt = _resolve_target(path, format)
    tags = _tags(metadata)
    rate = _frame_rate(fps)
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not 0 <= quality <= 100:
        raise ValueError(f"quality must be an integer in 0..100, got {quality!r}")

    stream = _frames(frames)
    try:
        first = next(stream)
    except StopIteration:
        raise ValueError("no frames to write: the frame source is empty") from None
    stream = _chain(first, stream)

    def encode(tmp: Path) -> None:
        if _pyav_can_write(fmt):
            _write_pyav(stream, tmp, fmt, rate, int(quality), first.shape, callback, tags)
        elif fmt in ("webp", "gif"):
            logger.warning("PyAV here cannot write %s (no %s encoder/muxer); using Pillow, which keeps all frames in memory",
                           fmt, _PYAV_ENCODER[fmt])
            _write_pillow(stream, tmp, fmt, rate, int(quality), callback)
        else:
            raise RuntimeError(
                f"this PyAV build has no {_PYAV_ENCODER[fmt]} encoder for {fmt}; install the PyPI wheel "
                f"(pip install --force-reinstall av) or write webp/gif instead"
            )

    return write_atomically(target, encode, overwrite=overwrite, what="video")


def write_image(image: FrameArray, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write one RGB image as PNG to ``path`` and return the path actually written.

    ``image``: uint8 ``[H,W,3]`` (numpy or torch; ``[1,H,W,3]`` and float in [0, 1] are accepted too).
    A name without a suffix gets ``.png``. Written like :func:`write_video`: through a temporary file, an existing
    file is kept (``still.png`` -> ``still_00001.png``; ``overwrite=True`` replaces it), the folder must exist,
    and OS failures raise :class:`WriteError`.
    """
    target = output_path(path, example="image.png")
    suffix = target.suffix.lower()
    if suffix != ".png":
        if suffix:
            raise ValueError(f"write_image writes PNG; name the file {target.stem + '.png'!r} instead of {target.name!r}")
        target = target.with_name(f"{target.name}.png")
    pixels = _to_uint8(image)
    if len(pixels) != 1:
        raise ValueError(f"write_image takes one image [H,W,3], got {len(pixels)} frames; use write_video for several")
    frame = pixels[0]
    if frame.shape[0] < 1 or frame.shape[1] < 1:
        raise ValueError(f"the image must be at least 1x1 pixels, got {frame.shape[1]}x{frame.shape[0]}")

    def encode(tmp: Path) -> None:
        from PIL import Image

        Image.fromarray(frame).save(tmp, format="PNG")

    return write_atomically(target, encode, overwrite=overwrite, what="image")


# ---------------------------------------------------------------------------------------------
# Arguments


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> tuple[torch.Tensor, float]:
    """All frames of a video file as uint8 [F,H,W,3] (RGB), and its frame rate; `max_frames` stops early."""
    import av

    source = Path(path).expanduser()
    if not source.is_file():
        raise FileNotFoundError(f"video not found: {source}")
    try:
        with av.open(str(source)) as container:
            if not container.streams.video:
                raise ValueError(f"{source} holds no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0) or float(settings.FPS)
            frames = []
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except av.FFmpegError as exc:
        raise ValueError(f"cannot read video {source}: {exc} (use an mp4, webm, webp or gif file)") from None
    if not frames:
        raise ValueError(f"{source} holds no frames")
    return torch.from_numpy(np.stack(frames)), fps


def _tags(metadata: Mapping[str, object] | None) -> dict[str, str]:
    """Container tags: strings kept, anything else as JSON (ComfyUI's convention for prompt and workflow)."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise ValueError(f"metadata must be a mapping of tag names to values, got {type(metadata).__name__}")
    return {str(key): value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}


def _resolve_target(path: str | os.PathLike, format: str | None) -> tuple[Path, str]:
    target = output_path(path, example="video.mp4")  # a file name in an existing, usable folder
    suffix = target.suffix.lower().lstrip(".")
    if format is None:
        if suffix not in VIDEO_FORMATS:
            raise ValueError(
                f"cannot tell the video format from {target.name!r}; use a .mp4/.webm/.webp/.gif name or pass format="
            )
        fmt = suffix
    else:
        fmt = format.lower().lstrip(".")
        if fmt not in VIDEO_FORMATS:
            raise ValueError(f"unknown video format {format!r}; choose one of {', '.join(VIDEO_FORMATS)}")
        if suffix in VIDEO_FORMATS and suffix != fmt:
            raise ValueError(f"file name {target.name!r} contradicts format={format!r}; make them agree")
        if suffix != fmt:
            target = target.with_name(f"{target.name}.{fmt}")
    return target, fmt


def _frame_rate(fps: float) -> Fraction:
    if isinstance(fps, bool) or not isinstance(fps, (int, float, Fraction, np.integer, np.floating)):
        raise ValueError(f"fps must be a number, got {fps!r}")
    if not math.isfinite(float(fps)) or fps <= 0:
        raise ValueError(f"fps must be a positive finite number, got {fps!r}")
    # 23.976 -> 2997/125; integer rates stay exact.
    exact = Fraction(fps) if isinstance(fps, (int, Fraction)) else Fraction(float(fps))
    return exact.limit_denominator(1001)


# ---------------------------------------------------------------------------------------------
# Frames


def _to_uint8(chunk: FrameArray) -> np.ndarray:
    """One chunk as a C-contiguous uint8 ``[F,H,W,3]`` array."""
    if isinstance(chunk, torch.Tensor):
        chunk = chunk.detach().cpu()
        if chunk.is_floating_point():
            chunk = chunk.float()
        chunk = chunk.numpy()
    elif not isinstance(chunk, np.ndarray):
        chunk = np.asarray(chunk)
    if chunk.ndim == 3:
        chunk = chunk[None]
    if chunk.ndim != 4 or chunk.shape[-1] != 3:
        hint = " (drop alpha with frames[..., :3])" if chunk.ndim == 4 and chunk.shape[-1] == 4 else ""
        raise ValueError(f"frames must be RGB [F,H,W,3] (or [H,W,3]), got shape {tuple(chunk.shape)}{hint}")
    if chunk.dtype == np.uint8:
        return np.ascontiguousarray(chunk)
    if np.issubdtype(chunk.dtype, np.floating):
        chunk = np.nan_to_num(chunk.astype(np.float32, copy=False))
        if chunk.size and chunk.max() > 1.5:
            raise ValueError(
                f"float frames must be in [0, 1], got values up to {chunk.max():.3g}; divide by 255 or pass uint8"
            )
        return np.ascontiguousarray(np.rint(np.clip(chunk, 0.0, 1.0) * 255.0).astype(np.uint8))
    raise ValueError(f"frames must be uint8 (0..255) or float (0..1), got dtype {chunk.dtype}")


def _frames(source: FrameSource) -> Iterator[np.ndarray]:
    """Single ``[H,W,3]`` uint8 frames from an array or an iterable of chunks, checking one size throughout."""
    chunks: Iterable[FrameArray] = [source] if isinstance(source, (np.ndarray, torch.Tensor)) else source
    size = None
    for chunk in chunks:
        arr = _to_uint8(chunk)
        if size is None and len(arr):
            size = arr.shape[1:3]
            if size[0] < 1 or size[1] < 1:
                raise ValueError(f"frames must be at least 1x1 pixels, got {size[1]}x{size[0]}")
        if len(arr) and arr.shape[1:3] != size:
            raise ValueError(f"all frames must share one size: got {arr.shape[2]}x{arr.shape[1]} after {size[1]}x{size[0]}")
        yield from arr


def _chain(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield first
    yield from rest


def _pad_even(frame: np.ndarray) -> np.ndarray:
    h, w = frame.shape[:2]
    if h % 2 == 0 and w % 2 == 0:
        return frame
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


# ---------------------------------------------------------------------------------------------
# Encoders


def _pyav_can_write(fmt: str) -> bool:
    import av

    if fmt not in av.formats_available:
        return False
    try:
        av.codec.Codec(_PYAV_ENCODER[fmt], "w")
    except Exception:  # PyAV raises UnknownCodecError (a ValueError subclass in some versions)
        return False
    return True


class _PyavEncoder:
    """One open PyAV container: `add` encodes frames as they come, `finish` flushes and writes the trailer."""

    def __init__(self, path: Path, fmt: str, rate: Fraction, quality: int, shape: tuple[int, ...],
                 tags: Mapping[str, str] | None = None):
        import av

        height, width = shape[0], shape[1]
        options: dict[str, str] = {}
        if fmt == "mp4":
            # index first (plays while downloading); custom tags (ComfyUI's prompt/workflow) need use_metadata_tags
            options["movflags"] = "+faststart+use_metadata_tags" if tags else "+faststart"
            height, width = height + height % 2, width + width % 2
        elif fmt in ("webp", "gif"):
            options["loop"] = "0"  # loop forever, like an image preview
        self.fmt, self.written = fmt, 0
        self.container = av.open(str(path), mode="w", format=fmt, options=options)
        try:
            if tags and fmt in ("mp4", "webm"):
                self.container.metadata.update(tags)  # before any stream, as ComfyUI does
            self.stream = self.container.add_stream(_PYAV_ENCODER[fmt], rate=rate)
            self.stream.width, self.stream.height = width, height
            self.to_frame = _frame_converter(fmt, self.stream, quality)
        except BaseException:
            self.abort()
            raise

    def add(self, frame: np.ndarray) -> None:
        if self.fmt == "mp4":
            frame = _pad_even(frame)
        for packet in self.stream.encode(self.to_frame(frame)):
            self.container.mux(packet)
        self.written += 1

    def finish(self) -> None:
        for packet in self.stream.encode(None):
            self.container.mux(packet)
        self.container.close()  # writes the trailer: a full disk can show up here

    def abort(self) -> None:
        with contextlib.suppress(Exception):  # keep the first error (or the interrupt), not a follow-up one
            self.container.close()


def _write_pyav(
    frames: Iterator[np.ndarray],
    path: Path,
    fmt: str,
    rate: Fraction,
    quality: int,
    shape: tuple[int, ...],
    callback: Callable[[int], None] | None,
    tags: Mapping[str, str] | None = None,
) -> None:
    encoder = _PyavEncoder(path, fmt, rate, quality, shape, tags)
    try:
        for frame in frames:
            encoder.add(frame)
            if callback is not None:
                callback(encoder.written)
    except BaseException:
        encoder.abort()
        raise
    encoder.finish()


def _reraise(target: Path, exc: BaseException) -> None:
    error = as_write_error(target, exc, what="video")
    if error is exc:
        raise exc
    raise error from exc


class VideoSink:
    """A video written while its frames are still being made: `add` appends frames (uint8 [f,H,W,3] or
    [H,W,3]), `close` publishes the file (never overwriting: a numbered sibling) and returns its path; any
    failure or `abort` leaves no file. Use as a context manager: an exception inside aborts.

    Needs a PyAV encoder for the format (mp4 and webm always; webp/gif where PyAV has them).
    """

    def __init__(self, path: str | os.PathLike, *, fps: float = 24, format: str | None = None, quality: int = 80,
                 overwrite: bool = False, metadata: Mapping[str, object] | None = None):
        self.target, self.fmt = _resolve_target(path, format)
        self.tags = _tags(metadata)  # container tags, as write_video writes them
        if not _pyav_can_write(self.fmt):
            raise ValueError(f"writing {self.fmt} while generating needs PyAV's {_PYAV_ENCODER[self.fmt]} encoder, "
                             "which this install lacks; write mp4 or webm")
        self.rate, self.quality, self.overwrite = _frame_rate(fps), int(quality), overwrite
        try:
            self.tmp = reserve_temp(self.target)
        except OSError as exc:
            raise WriteError.from_exception(self.target, exc, what="video") from exc
        self.encoder: _PyavEncoder | None = None

    def add(self, frames: FrameSource) -> None:
        try:
            for frame in _frames(frames):
                if self.encoder is None:
                    self.encoder = _PyavEncoder(self.tmp, self.fmt, self.rate, self.quality, frame.shape, self.tags)
                self.encoder.add(frame)
        except BaseException as exc:
            self.abort()
            _reraise(self.target, exc)

    @property
    def written(self) -> int:
        return self.encoder.written if self.encoder is not None else 0

    def close(self) -> Path:
        """Finish the file and publish it; returns the path written."""
        if self.encoder is None:
            self.abort()
            raise ValueError("no frames to write: nothing was added")
        try:
            self.encoder.finish()
            return publish(self.tmp, self.target, self.overwrite)
        except BaseException as exc:
            self.abort()
            _reraise(self.target, exc)

    def abort(self) -> None:
        """Stop and remove the unfinished file."""
        if self.encoder is not None:
            self.encoder.abort()
            self.encoder = None
        with contextlib.suppress(OSError):
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> VideoSink:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is not None:
            self.abort()


def _frame_converter(fmt: str, stream, quality: int) -> Callable[[np.ndarray], object]:
    """Configure ``stream`` for ``fmt`` and return the numpy -> ``av.VideoFrame`` conversion."""
    import av

    if fmt in ("mp4", "webm"):
        stream.pix_fmt = "yuv420p"
        if fmt == "mp4":
            stream.options = {"crf": str(round(51 - 0.4 * quality)), "preset": "medium"}
        else:
            stream.options = {"crf": str(round(63 - 0.45 * quality)), "b": "0", "row-mt": "1", "cpu-used": "4"}
        return _yuv420_converter(stream)
    if fmt == "webp":
        stream.pix_fmt = "bgra"  # libwebp does its own RGB->YUV, better than a swscale round trip
        stream.options = {"quality": str(quality), "lossless": "0"}
        return lambda frame: av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="bgra")
    stream.pix_fmt = "pal8"
    return _palette_frame


def _yuv420_converter(stream) -> Callable[[np.ndarray], object]:
    """RGB -> BT.709 limited-range yuv420p, tagged on the stream so players decode with the same matrix."""
    import av
    from av.video.reformatter import ColorRange, Colorspace

    probe = av.VideoFrame.from_ndarray(np.zeros((2, 2, 3), np.uint8), format="rgb24")
    try:
        probe.reformat(format="yuv420p", dst_colorspace=Colorspace.ITU709, dst_color_range=ColorRange.MPEG)
    except TypeError:  # older PyAV without colour-range arguments: untagged swscale default (BT.601)
        return lambda frame: av.VideoFrame.from_ndarray(frame, format="rgb24")
    ctx = stream.codec_context
    ctx.colorspace, ctx.color_range, ctx.color_primaries, ctx.color_trc = 1, 1, 1, 1  # AVCOL_*_BT709, MPEG range

    def convert(frame: np.ndarray):
        rgb = av.VideoFrame.from_ndarray(frame, format="rgb24")
        return rgb.reformat(format="yuv420p", dst_colorspace=Colorspace.ITU709, dst_color_range=ColorRange.MPEG)

    return convert


def _palette_frame(frame: np.ndarray):
    """A pal8 frame with its own adaptive 256-colour palette (Pillow median cut + dithering)."""
    import av
    from PIL import Image

    indexed = Image.fromarray(frame).quantize(colors=256)
    rgb = np.zeros((256, 3), np.uint8)
    palette = np.frombuffer(bytes(indexed.getpalette()), np.uint8).reshape(-1, 3)[:256]
    rgb[: len(palette)] = palette
    argb = np.concatenate([np.full((256, 1), 255, np.uint8), rgb], axis=1)
    return av.VideoFrame.from_ndarray((np.ascontiguousarray(np.asarray(indexed)), argb), format="pal8")


def _write_pillow(
    frames: Iterator[np.ndarray],
    path: Path,
    fmt: str,
    rate: Fraction,
    quality: int,
    callback: Callable[[int], None] | None,
) -> None:
    from PIL import Image

    images = []
    for frame in frames:
        images.append(Image.fromarray(frame))
        if callback is not None:
            callback(len(images))
    duration = round(1000 / float(rate))
    options = {"quality": quality} if fmt == "webp" else {}
    images[0].save(path, format=fmt.upper(), save_all=True, append_images=images[1:], duration=duration, loop=0, **options)
