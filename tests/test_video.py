"""Video writers: round trips through a decoder, naming, atomicity and input conversion."""
from __future__ import annotations

import errno
import logging
import os
import pickle
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

import pyramid_core.outputs as outputs
import pyramid_core.video as video
from pyramid_core.video import WriteError, check_writable, write_image, write_video

FPS = 24


def gradient_frames(n: int = 12, height: int = 48, width: int = 64) -> np.ndarray:
    """Smooth, slowly moving RGB gradients, uint8 [n,H,W,3]."""
    y = np.linspace(0, 1, height)[:, None]
    x = np.linspace(0, 1, width)[None, :]
    frames = []
    for i in range(n):
        r = 0.5 + 0.35 * np.sin(np.pi * x + 0.3 * i) + 0 * y
        g = 0.2 + 0.6 * y + 0 * x
        b = 0.8 - 0.5 * x * y - 0.02 * i
        frames.append(np.stack([r, g, b], axis=-1))
    return np.rint(np.stack(frames) * 255).astype(np.uint8)


def decode_pyav(path: Path) -> tuple[np.ndarray, av.video.stream.VideoStream, list[int]]:
    """All frames (rgb24), the stream and the frame pts."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames, pts = [], []
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            pts.append(frame.pts)
        return np.stack(frames), stream, pts


def decode_pillow(path: Path) -> tuple[np.ndarray, list[int], dict]:
    """All frames of an animated image (RGB), per-frame durations in ms and the image info."""
    with Image.open(path) as im:
        frames, durations = [], []
        for i in range(im.n_frames):
            im.seek(i)
            frames.append(np.asarray(im.convert("RGB")))
            durations.append(im.info["duration"])
        return np.stack(frames), durations, dict(im.info)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def pixel_error(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(diff.mean()), int(diff.max())


# ------------------------------------------------------------------------------ round trips


def test_mp4_round_trip(tmp_path):
    frames = gradient_frames()
    out = write_video(frames, tmp_path / "clip.mp4", fps=FPS)
    assert out == (tmp_path / "clip.mp4").resolve() and out.is_file()
    decoded, stream, pts = decode_pyav(out)
    assert decoded.shape == frames.shape
    assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
    assert stream.average_rate == FPS
    assert [p * stream.time_base for p in pts] == [Fraction(i, FPS) for i in range(len(frames))]
    # yuv420p alone costs ~1.7 levels on these colours; a BT.601/709 mix-up costs ~7.
    mean_err, max_err = pixel_error(decoded, frames)
    assert mean_err < 3.0 and max_err < 24, (mean_err, max_err)
    assert leftovers(tmp_path) == ["clip.mp4"]


def test_webm_round_trip(tmp_path):
    frames = gradient_frames(n=10, height=49, width=65)  # VP9 takes odd sizes as they are
    out = write_video(frames, tmp_path / "clip.webm", fps=FPS)
    decoded, stream, pts = decode_pyav(out)
    assert decoded.shape == frames.shape
    assert stream.codec_context.name == "vp9"
    assert stream.time_base == Fraction(1, 1000)  # Matroska: millisecond timestamps
    assert all(abs(p * stream.time_base - Fraction(i, FPS)) <= Fraction(1, 1000) for i, p in enumerate(pts)), pts
    mean_err, max_err = pixel_error(decoded, frames)
    assert mean_err < 2.5 and max_err < 20, (mean_err, max_err)


def test_gif_round_trip(tmp_path):
    frames = gradient_frames(n=12)
    out = write_video(frames, tmp_path / "clip.gif", fps=FPS)
    decoded, stream, pts = decode_pyav(out)
    assert decoded.shape == frames.shape
    assert stream.codec_context.name == "gif" and stream.time_base == Fraction(1, 100)
    # GIF delays are centiseconds: 24 fps -> delays of 4 or 5 cs that keep the clock on time.
    assert all(abs(p - round(100 * i / FPS)) <= 1 for i, p in enumerate(pts)), pts
    mean_err, max_err = pixel_error(decoded, frames)
    assert mean_err < 4.0 and max_err < 32, (mean_err, max_err)
    with Image.open(out) as im:
        assert im.info["loop"] == 0


def test_webp_round_trip(tmp_path):
    # FFmpeg's webp demuxer cannot decode animated WebP, so Pillow (libwebp) decodes it.
    frames = gradient_frames(n=12, height=49, width=65)
    out = write_video(frames, tmp_path / "clip.webp", fps=FPS)
    decoded, durations, info = decode_pillow(out)
    assert decoded.shape == frames.shape
    assert info["loop"] == 0
    assert all(d in (41, 42) for d in durations) and abs(sum(durations) - 1000 * len(frames) / FPS) <= 2, durations
    mean_err, max_err = pixel_error(decoded, frames)
    assert mean_err < 3.5 and max_err < 24, (mean_err, max_err)


def test_mp4_odd_size_is_padded_by_edge_repeat(tmp_path):
    frames = gradient_frames(n=6, height=47, width=63)
    decoded, _, _ = decode_pyav(write_video(frames, tmp_path / "odd.mp4"))
    assert decoded.shape == (6, 48, 64, 3)
    mean_err, _ = pixel_error(decoded[:, :47, :63], frames)
    assert mean_err < 3.0
    mean_err, _ = pixel_error(decoded[:, 47, :63], frames[:, 46])  # padded row repeats the last one
    assert mean_err < 3.0
    mean_err, _ = pixel_error(decoded[:, :47, 63], frames[:, :, 62])  # ...and the padded column the last column
    assert mean_err < 3.5


def test_quality_changes_mp4_size(tmp_path):
    frames = gradient_frames(n=8)
    low = write_video(frames, tmp_path / "low.mp4", quality=10)
    high = write_video(frames, tmp_path / "high.mp4", quality=100)
    assert low.stat().st_size < high.stat().st_size
    with pytest.raises(ValueError, match="quality"):
        write_video(frames, tmp_path / "bad.mp4", quality=101)


# ------------------------------------------------------------------------------ naming and atomicity


def test_existing_file_gets_a_counter_and_is_never_overwritten(tmp_path):
    frames = gradient_frames(n=4)
    target = tmp_path / "clip.mp4"
    target.write_bytes(b"keep me")
    first = write_video(frames, target)
    second = write_video(frames, target)
    assert (first.name, second.name) == ("clip_00001.mp4", "clip_00002.mp4")
    assert target.read_bytes() == b"keep me"
    assert decode_pyav(second)[0].shape[0] == 4
    replaced = write_video(frames, target, overwrite=True)
    assert replaced == target.resolve() and decode_pyav(target)[0].shape[0] == 4
    assert leftovers(tmp_path) == ["clip.mp4", "clip_00001.mp4", "clip_00002.mp4"]


def test_missing_folder_is_an_error_that_names_it(tmp_path):
    missing = tmp_path / "no" / "such"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        write_video(gradient_frames(n=2), missing / "clip.mp4")
    assert leftovers(tmp_path) == []


class Cancelled(Exception):
    pass


@pytest.mark.parametrize("fmt", video.VIDEO_FORMATS)
def test_cancel_from_the_frame_iterator_leaves_nothing(tmp_path, fmt):
    frames = gradient_frames(n=6)

    def chunks():
        yield frames[:2]
        yield frames[2:4]
        raise Cancelled("user pressed cancel")

    with pytest.raises(Cancelled):
        write_video(chunks(), tmp_path / f"clip.{fmt}")
    assert leftovers(tmp_path) == []


def test_cancel_from_callback_and_bad_chunk_leave_nothing(tmp_path):
    frames = gradient_frames(n=6)
    existing = tmp_path / "clip.mp4"
    existing.write_bytes(b"old")

    def stop_at_three(n: int) -> None:
        if n == 3:
            raise KeyboardInterrupt  # BaseException: cleanup must still run

    with pytest.raises(KeyboardInterrupt):
        write_video(frames, existing, overwrite=True, callback=stop_at_three)
    with pytest.raises(ValueError, match="one size"):
        write_video(iter([frames[:2], gradient_frames(n=2, width=32)]), existing)
    assert leftovers(tmp_path) == ["clip.mp4"] and existing.read_bytes() == b"old"


def test_streaming_chunks_are_pulled_lazily(tmp_path):
    frames = gradient_frames(n=9)
    pulled: list[int] = []
    seen_when: list[int] = []

    def chunks():
        for i in range(0, 9, 3):
            pulled.append(i)
            yield torch.from_numpy(frames[i : i + 3])
        pulled.append(9)
        yield frames[8]  # a single [H,W,3] frame is a chunk too

    out = write_video(chunks(), tmp_path / "stream.mp4", callback=lambda n: seen_when.append(len(pulled)))
    assert decode_pyav(out)[0].shape[0] == 10
    # Frames 1-3 were encoded while only the first chunk had been produced.
    assert seen_when[:3] == [1, 1, 1] and seen_when[3] == 2


# ------------------------------------------------------------------------------ input conversion


def test_float_input_is_converted(tmp_path):
    frames = gradient_frames(n=5)
    expected = frames.copy()
    expected[0, 0, 0] = [0, 255, 128]  # clamped, and 127.5 rounds half to even
    ref = decode_pyav(write_video(expected, tmp_path / "uint8.mp4"))[0]

    as_float = torch.from_numpy(frames).float() / 255
    as_float[0, 0, 0] = torch.tensor([-0.2, 1.2, 0.5])  # slight overshoot is clamped
    # Same uint8 pixels in => same bitstream out, so the decodes are identical.
    assert np.array_equal(decode_pyav(write_video(as_float, tmp_path / "f32.mp4"))[0], ref)
    assert np.array_equal(decode_pyav(write_video(as_float.double().numpy(), tmp_path / "f64.mp4"))[0], ref)
    bf16 = decode_pyav(write_video(as_float.to(torch.bfloat16), tmp_path / "bf16.mp4"))[0]
    assert pixel_error(bf16, ref)[0] < 1.5  # bf16 keeps ~8 bits, so values move by a level or so
    with pytest.raises(ValueError, match="divide by 255"):
        write_video(frames.astype(np.float32), tmp_path / "x.mp4")


def test_bad_inputs_name_the_fix(tmp_path):
    frames = gradient_frames(n=2)
    with pytest.raises(ValueError, match="format"):
        write_video(frames, tmp_path / "clip.avi")
    with pytest.raises(ValueError, match="contradicts"):
        write_video(frames, tmp_path / "clip.webm", format="mp4")
    with pytest.raises(ValueError, match="drop alpha"):
        write_video(np.zeros((2, 8, 8, 4), np.uint8), tmp_path / "clip.mp4")
    with pytest.raises(ValueError, match="no frames"):
        write_video(iter([]), tmp_path / "clip.mp4")
    with pytest.raises(ValueError, match="fps"):
        write_video(frames, tmp_path / "clip.mp4", fps=0)
    with pytest.raises(ValueError, match="uint8"):
        write_video(frames.astype(np.int64), tmp_path / "clip.mp4")
    assert leftovers(tmp_path) == []
    out = write_video(frames, tmp_path / "noext", format="gif")
    assert out.name == "noext.gif" and decode_pyav(out)[0].shape[0] == 2


@pytest.mark.parametrize("fmt", ["webp", "gif"])
def test_pillow_fallback_without_pyav_encoder(tmp_path, monkeypatch, caplog, fmt):
    monkeypatch.setattr(video, "_pyav_can_write", lambda f: False)
    frames = gradient_frames(n=6)
    with caplog.at_level(logging.WARNING, logger="pyramid_core.video"):
        out = write_video(frames, tmp_path / f"clip.{fmt}", fps=FPS)
    assert "Pillow" in caplog.text
    decoded, durations, _ = decode_pillow(out)
    assert decoded.shape == frames.shape
    assert pixel_error(decoded, frames)[0] < 4.0, pixel_error(decoded, frames)
    assert sum(durations) == pytest.approx(1000 * len(frames) / FPS, abs=6 * 10)
    with pytest.raises(RuntimeError, match="pip install"):
        write_video(frames, tmp_path / "clip.mp4")
    assert leftovers(tmp_path) == [f"clip.{fmt}"]


# ------------------------------------------------------------------------------ still images


def test_write_image_round_trip_and_naming(tmp_path):
    image = gradient_frames(n=1, height=33, width=47)[0]
    out = write_image(image, tmp_path / "still.png")
    assert out == (tmp_path / "still.png").resolve()
    with Image.open(out) as im:
        assert im.format == "PNG" and np.array_equal(np.asarray(im.convert("RGB")), image)  # lossless
    again = write_image(torch.from_numpy(image).float() / 255, tmp_path / "still.png")  # float [0,1] torch too
    assert again.name == "still_00001.png"
    with Image.open(again) as im:
        assert np.array_equal(np.asarray(im), image)
    assert write_image(image[None], tmp_path / "noext").name == "noext.png"  # [1,H,W,3] and a missing suffix
    before = out.stat().st_mtime_ns
    assert write_image(np.zeros_like(image), out, overwrite=True) == out and out.stat().st_mtime_ns >= before
    with Image.open(out) as im:
        assert not np.asarray(im).any()
    assert leftovers(tmp_path) == ["noext.png", "still.png", "still_00001.png"]


def test_write_image_bad_inputs_name_the_fix(tmp_path):
    image = gradient_frames(n=2)
    with pytest.raises(ValueError, match="still.png"):
        write_image(image[0], tmp_path / "still.jpg")
    with pytest.raises(ValueError, match="write_video"):
        write_image(image, tmp_path / "still.png")
    with pytest.raises(ValueError, match="is a folder"):
        write_image(image[0], tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_image(image[0], tmp_path / "missing" / "still.png")
    assert leftovers(tmp_path) == []


def test_all_numbered_names_taken_is_file_exists_error(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "_MAX_COUNTER", 2)
    for name in ("still.png", "still_00001.png", "still_00002.png"):
        (tmp_path / name).write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="choose another name"):
        write_image(gradient_frames(n=1)[0], tmp_path / "still.png")
    assert leftovers(tmp_path) == ["still.png", "still_00001.png", "still_00002.png"]
    assert all((tmp_path / n).read_bytes() == b"mine" for n in leftovers(tmp_path))


# ------------------------------------------------------------------------------ OS errors: disk full, permissions


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def assert_write_error(info: pytest.ExceptionInfo, target: Path, *phrases: str, code: int | None = None) -> None:
    """One WriteError naming the target, the reason and the fix, with the original error kept as the cause."""
    err = info.value
    assert type(err) is WriteError and isinstance(err, OSError)
    message = str(err)
    assert message.startswith(f"cannot write {target.resolve()}: "), message
    assert "; " in message and "Errno" not in message, message
    for phrase in phrases:
        assert phrase in message, message
    assert err.__cause__ is not None
    if code is not None:
        assert err.errno == code and err.__cause__.errno == code


def partial_then(exc: BaseException):
    """A stand-in encoder that writes some bytes to its (temporary) output, then fails with ``exc``."""

    def encoder(*args, **kwargs):
        target = next(a for a in args if isinstance(a, (str, Path)))
        with open(target, "ab") as handle:
            handle.write(b"\0" * 1000)
        raise exc

    return encoder


@pytest.mark.parametrize("fmt", video.VIDEO_FORMATS)
def test_disk_full_in_pyav_is_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch, fmt):
    monkeypatch.setattr(video, "_write_pyav", partial_then(enospc()))
    target = tmp_path / f"clip.{fmt}"
    with pytest.raises(WriteError) as info:
        write_video(gradient_frames(n=3), target)
    assert_write_error(info, target, "no space left on device", "free some space", code=errno.ENOSPC)
    assert leftovers(tmp_path) == []


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("fmt", video.VIDEO_FORMATS)
def test_real_ffmpeg_disk_full_error_is_mapped(tmp_path, monkeypatch, fmt):
    # FFmpeg itself writes to /dev/full (every write fails with ENOSPC), as on a full disk.
    real_open = av.open
    monkeypatch.setattr(av, "open", lambda file, *a, **k: real_open("/dev/full", *a, **k))
    target = tmp_path / f"clip.{fmt}"
    with pytest.raises(WriteError) as info:
        write_video(gradient_frames(n=4), target)
    assert_write_error(info, target, "no space left on device", code=errno.ENOSPC)
    assert isinstance(info.value.__cause__, av.error.FFmpegError)
    assert leftovers(tmp_path) == []


def test_disk_full_in_pillow_writers(tmp_path, monkeypatch):
    monkeypatch.setattr(Image.Image, "save", lambda self, fp, *a, **k: partial_then(enospc())(fp))
    with pytest.raises(WriteError) as info:
        write_image(gradient_frames(n=1)[0], tmp_path / "still.png")
    assert_write_error(info, tmp_path / "still.png", "no space left on device", code=errno.ENOSPC)
    monkeypatch.setattr(video, "_pyav_can_write", lambda f: False)  # the Pillow fallback for animations
    with pytest.raises(WriteError) as info:
        write_video(gradient_frames(n=3), tmp_path / "clip.gif")
    assert_write_error(info, tmp_path / "clip.gif", "no space left on device", code=errno.ENOSPC)
    assert leftovers(tmp_path) == []


def test_late_disk_full_at_flush_publishes_nothing(tmp_path, monkeypatch):
    # Network drives and quotas may report a full disk only when the data is flushed.
    def fsync(fd):
        raise OSError(errno.EDQUOT if hasattr(errno, "EDQUOT") else errno.ENOSPC, "Disk quota exceeded")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(WriteError, match="free some space"):
        write_video(gradient_frames(n=3), tmp_path / "clip.mp4")
    with pytest.raises(WriteError, match="free some space"):
        write_image(gradient_frames(n=1)[0], tmp_path / "still.png")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "code, phrases",
    [
        (errno.ENOSPC, ("no space left on device", "free some space or choose another output folder")),
        (errno.EACCES, ("permission denied", "choose a folder you can write to")),
        (errno.EPERM, ("operation not permitted", "choose a folder you can write to")),
        (errno.EROFS, ("read-only", "writable disk")),
        (errno.ENOENT, ("folder does not exist", "create the folder")),
        (errno.EIO, ("input/output error", "check the disk")),
        (errno.EXDEV, ("cross-device", "choose another")),  # an unlisted errno: the OS's words, lower-cased
    ],
)
def test_os_reasons_in_plain_words(tmp_path, monkeypatch, code, phrases):
    monkeypatch.setattr(Image.Image, "save", lambda self, fp, *a, **k: partial_then(OSError(code, os.strerror(code)))(fp))
    with pytest.raises(WriteError) as info:
        write_image(gradient_frames(n=1)[0], tmp_path / "still.png")
    assert_write_error(info, tmp_path / "still.png", *phrases, code=code)
    assert leftovers(tmp_path) == []


def test_encoder_errors_without_errno_are_write_errors_too(tmp_path, monkeypatch):
    monkeypatch.setattr(video, "_write_pyav", partial_then(av.error.FFmpegError(-22, "Invalid argument")))
    with pytest.raises(WriteError) as info:
        write_video(gradient_frames(n=3), tmp_path / "clip.webm")
    assert_write_error(info, tmp_path / "clip.webm", "video encoder failed", "Invalid argument", "another format")
    assert info.value.errno is None
    monkeypatch.setattr(Image.Image, "save", lambda self, fp, *a, **k: partial_then(OSError("encoder error -2"))(fp))
    with pytest.raises(WriteError, match="image encoder failed"):
        write_image(gradient_frames(n=1)[0], tmp_path / "still.png")
    assert leftovers(tmp_path) == []


def test_unwritable_folder_fails_with_the_fix(unwritable_folder):
    frames = gradient_frames(n=2)
    for write, name in ((lambda p: write_video(frames, p), "clip.mp4"), (lambda p: write_image(frames[0], p), "a.png")):
        with pytest.raises(WriteError) as info:
            write(unwritable_folder / name)
        assert_write_error(info, unwritable_folder / name, "permission denied", "choose a folder you can write to",
                           code=errno.EACCES)
    with pytest.raises(WriteError, match="permission denied"):
        check_writable(unwritable_folder / "clip.mp4")
    assert leftovers(unwritable_folder) == []


def test_read_only_file_system(tmp_path, monkeypatch):
    def read_only(path, flags, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(WriteError) as info:
        write_video(gradient_frames(n=2), tmp_path / "clip.mp4")
    assert_write_error(info, tmp_path / "clip.mp4", "the file system is read-only", "writable disk", code=errno.EROFS)
    with pytest.raises(WriteError, match="read-only"):
        check_writable(tmp_path / "clip.mp4")
    monkeypatch.undo()
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------ interrupts


@pytest.mark.parametrize("fmt", video.VIDEO_FORMATS)
def test_keyboard_interrupt_mid_write_leaves_nothing(tmp_path, fmt):
    frames = gradient_frames(n=6)

    def chunks():
        yield frames[:3]
        raise KeyboardInterrupt  # Ctrl+C while frames are still being decoded

    with pytest.raises(KeyboardInterrupt):  # passed on as it is, never wrapped
        write_video(chunks(), tmp_path / f"clip.{fmt}")
    assert leftovers(tmp_path) == []


def test_keyboard_interrupt_in_pillow_or_at_flush_leaves_nothing(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(Image.Image, "save", lambda self, fp, *a, **k: partial_then(KeyboardInterrupt())(fp))
        with pytest.raises(KeyboardInterrupt):
            write_image(gradient_frames(n=1)[0], tmp_path / "still.png")

    def interrupted_fsync(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted_fsync)
    with pytest.raises(KeyboardInterrupt):
        write_video(gradient_frames(n=3), tmp_path / "clip.webm")
    assert leftovers(tmp_path) == []


def test_interrupt_is_not_replaced_by_a_close_error(tmp_path, monkeypatch):
    # Ctrl+C during encoding, then closing the half-written container fails too: the interrupt must win.
    real_open = av.open

    class FailingClose:
        def __init__(self, container):
            self._container = container

        def __getattr__(self, name):
            return getattr(self._container, name)

        def close(self):
            self._container.close()
            raise enospc()

    monkeypatch.setattr(av, "open", lambda *a, **k: FailingClose(real_open(*a, **k)))

    def stop(n: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_video(gradient_frames(n=3), tmp_path / "clip.mp4", callback=stop)
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------ check_writable


def test_check_writable(tmp_path):
    check_writable(tmp_path / "clip.mp4")  # fine, and leaves nothing behind
    (tmp_path / "clip.mp4").write_bytes(b"existing")
    check_writable(tmp_path / "clip.mp4")  # an existing file is fine too: the writer picks a numbered name
    assert leftovers(tmp_path) == ["clip.mp4"] and (tmp_path / "clip.mp4").read_bytes() == b"existing"
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'missing'}.*create it"):
        check_writable(tmp_path / "missing" / "clip.mp4")
    with pytest.raises(WriteError, match="not a folder"):
        check_writable(tmp_path / "clip.mp4" / "inner.mp4")
    with pytest.raises(ValueError, match="is a folder"):
        check_writable(tmp_path)
    assert leftovers(tmp_path) == ["clip.mp4"]


def test_check_writable_catches_a_full_disk(tmp_path, monkeypatch):
    class FullFile:
        def __init__(self, path, mode):
            self._handle = open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._handle.close()

        def write(self, data):
            raise enospc()

    monkeypatch.setattr(outputs, "open", FullFile, raising=False)
    with pytest.raises(WriteError) as info:
        check_writable(tmp_path / "clip.mp4")
    assert_write_error(info, tmp_path / "clip.mp4", "no space left on device", code=errno.ENOSPC)
    assert leftovers(tmp_path) == []


def test_write_error_pickles_and_reads_well():
    err = WriteError("/x/out.mp4", "no space left on device", "free some space or choose another output folder",
                     errno.ENOSPC)
    assert str(err) == "cannot write /x/out.mp4: no space left on device; free some space or choose another output folder"
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is WriteError and str(copy) == str(err) and copy.errno == errno.ENOSPC
    assert copy.filename == "/x/out.mp4" and copy.path == Path("/x/out.mp4")
