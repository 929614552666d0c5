"""Video writers: round trips through a decoder, naming, atomicity and input conversion."""
from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

import pyramid_core.video as video
from pyramid_core.video import write_video

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
