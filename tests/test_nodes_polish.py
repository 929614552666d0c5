"""What ComfyUI users expect around the nodes: saved videos carry their workflow, colour previews from a
latent->RGB map fitted to the loaded VAE, a tooltip on every input, template thumbnails, the "(none found)"
entry's error, and one rule for temp beyond the trained length.

`python -m tests.test_nodes_polish` redraws the template thumbnails (workflows/<name>.jpg).
"""
from __future__ import annotations

import json
import struct
import time
import warnings
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

import nodes
from pyramid_core.codec import LatentCodec
from pyramid_core.latent_format import denormalize_latents, latent_factors
from pyramid_core.latent_rgb import (
    channel_stretch,
    fit_latent_rgb,
    pooled_decode,
    smooth_latents,
)
from pyramid_core.loading import load_vae
from pyramid_core.memory import MemoryManager
from pyramid_core.validation import temp_beyond_training
from tests.reference import REPO_ROOT, model_dir
from tools.thumbnails import THUMBNAIL_BYTES, THUMBNAIL_SIZE, THUMBNAILS

M = nodes.NODE_CLASS_MAPPINGS
WORKFLOWS = REPO_ROOT / "workflows"
PROMPT = "a cat walking on the beach at sunset"


def frames_for_video(count=9, height=64, width=96):
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    return torch.stack([torch.stack([x, y, (x + y + t / count) % 1], -1) for t in range(count)])


# ------------------------------------------------------------------------------------ metadata

API_PROMPT = {"6": {"class_type": "PyramidFlowCoreSaveVideo", "inputs": {"fps": 24.0, "format": "mp4"}}}
UI_WORKFLOW = {"last_node_id": 6, "nodes": [{"id": 6, "type": "PyramidFlowCoreSaveVideo"}], "links": [], "version": 0.4}


def tags(path: Path) -> dict[str, str]:
    """Container tags, keys lower-cased (Matroska stores them upper-case)."""
    with av.open(str(path)) as container:
        return {key.lower(): value for key, value in container.metadata.items()}


def mp4_boxes(data: bytes, start: int = 0, end: int | None = None) -> list[tuple[str, int, int]]:
    """(type, payload start, box end) of the ISO-BMFF boxes in data[start:end]."""
    end = len(data) if end is None else end
    boxes = []
    while start + 8 <= end:
        size, kind = struct.unpack(">I4s", data[start:start + 8])
        header = 8
        if size == 1:
            size, header = struct.unpack(">Q", data[start + 8:start + 16])[0], 16
        elif size == 0:
            size = end - start
        boxes.append((kind.decode("latin-1"), start + header, start + size))
        start += size
    return boxes


def mp4_comfy_tags(path: Path) -> tuple[dict[str, object], list[str]]:
    """What ComfyUI's frontend reads from an mp4 dropped on the canvas: the prompt and workflow items of
    udta/meta ('keys' + 'ilst', JSON values), and the order of the top-level boxes."""
    data = path.read_bytes()
    top = mp4_boxes(data)
    (moov,) = [b for b in top if b[0] == "moov"]
    (udta,) = [b for b in mp4_boxes(data, moov[1], moov[2]) if b[0] == "udta"]
    (meta,) = [b for b in mp4_boxes(data, udta[1], udta[2]) if b[0] == "meta"]
    inner = {kind: (s, e) for kind, s, e in mp4_boxes(data, meta[1] + 4, meta[2])}  # meta is a full box
    s, e = inner["keys"]
    count = struct.unpack(">I", data[s + 4:s + 8])[0]
    names, at = [], s + 8
    for _ in range(count):
        size = struct.unpack(">I", data[at:at + 4])[0]
        names.append(data[at + 8:at + size].decode())  # after size and the 'mdta' namespace
        at += size
    found = {}
    s, e = inner["ilst"]
    for kind, item_start, item_end in mp4_boxes(data, s, e):
        index = struct.unpack(">I", kind.encode("latin-1"))[0]  # the item's type is its 1-based key index
        (box,) = [b for b in mp4_boxes(data, item_start, item_end) if b[0] == "data"]
        name = names[index - 1]
        if name.lower() in ("prompt", "workflow"):  # the frontend parses these two as JSON, nothing else
            found[name] = json.loads(data[box[1] + 8:box[2]].decode())  # after type and locale
    return found, [b[0] for b in top]


def test_save_video_embeds_prompt_and_workflow_as_comfyui_does(comfy, base):
    frames = frames_for_video()
    saver = M["PyramidFlowCoreSaveVideo"]()
    out = saver.save(frames, 24.0, "mp4", 80, "meta/clip", prompt=API_PROMPT, extra_pnginfo={"workflow": UI_WORKFLOW})
    path = base / "output" / "meta" / out["ui"]["images"][0]["filename"]
    read = tags(path)
    assert json.loads(read["prompt"]) == API_PROMPT and json.loads(read["workflow"]) == UI_WORKFLOW
    found, order = mp4_comfy_tags(path)
    assert found == {"prompt": API_PROMPT, "workflow": UI_WORKFLOW}, "the boxes ComfyUI's frontend parses"
    assert order.index("moov") < order.index("mdat"), "faststart: the tags are at the front of the file"
    video = out["result"][0]
    assert video.get_frame_count() == 9 and video.get_frame_rate() == 24, "still ComfyUI's native VIDEO"

    webm = saver.save(frames, 24.0, "webm", 80, "meta/clip", prompt=API_PROMPT, extra_pnginfo={"workflow": UI_WORKFLOW})
    read = tags(base / "output" / "meta" / webm["ui"]["images"][0]["filename"])
    assert json.loads(read["prompt"]) == API_PROMPT and json.loads(read["workflow"]) == UI_WORKFLOW


def test_disable_metadata_writes_no_prompt_or_workflow(comfy, base, monkeypatch):
    import comfy.cli_args

    monkeypatch.setattr(comfy.cli_args.args, "disable_metadata", True)
    saver = M["PyramidFlowCoreSaveVideo"]()
    for fmt in ("mp4", "webm"):
        out = saver.save(frames_for_video(), 24.0, fmt, 80, "meta/private", prompt=API_PROMPT,
                         extra_pnginfo={"workflow": UI_WORKFLOW})
        read = tags(base / "output" / "meta" / out["ui"]["images"][0]["filename"])
        assert not {"prompt", "workflow"} & set(read), read
    assert out["result"][0].get_frame_count() == 9


def test_the_executor_fills_the_hidden_inputs_and_the_workflow_comes_back(comfy, base):
    import workflow
    from stock_nodes import STOCK_NODE_CLASS_MAPPINGS

    mappings = {**M, **STOCK_NODE_CLASS_MAPPINGS}
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "2": {"class_type": "PyramidFlowCoreSaveVideo",
              "inputs": {"images": ["1", 0], "fps": 8.0, "format": "mp4", "quality": 50, "filename_prefix": "meta/run"}},
    }
    outputs = workflow.execute(prompt, mappings, {"extra_pnginfo": {"workflow": UI_WORKFLOW}})
    saved = outputs["2"]["images"][0]
    found, _ = mp4_comfy_tags(base / "output" / saved["subfolder"] / saved["filename"])
    assert found == {"prompt": prompt, "workflow": UI_WORKFLOW}


# ------------------------------------------------------------------------------ colour previews


class LinearCodec:
    """A codec whose decode is exactly affine in the raw latent (nearest-upsampled x8): the fit must recover it."""

    def __init__(self, family: str, weight: torch.Tensor, bias: torch.Tensor):
        self.family, self.weight, self.bias = family, weight, bias

    def rgb(self, raw_frame: torch.Tensor) -> torch.Tensor:  # [16,h,w] -> [h,w,3]
        return torch.einsum("chw,cr->hwr", raw_frame.double(), self.weight.double()) + self.bias.double()

    def decode(self, latents: torch.Tensor, output_type: str = "pt") -> torch.Tensor:
        assert output_type == "float" and latents.shape[2] == 1
        raw = denormalize_latents(latents, self.family)[0, :, 0]
        return self.rgb(raw).repeat_interleave(8, 0).repeat_interleave(8, 1)[None].float()


@pytest.mark.parametrize("family", ["flux", "mmdit"])
def test_the_fit_recovers_an_affine_decoder_and_handles_both_normalisations(family):
    g = torch.Generator().manual_seed(1)
    codec = LinearCodec(family, 0.05 * torch.randn(16, 3, generator=g), torch.tensor([0.5, 0.4, 0.6]))
    fitted = fit_latent_rgb(codec)
    assert torch.allclose(fitted.weight, codec.weight, atol=1e-5) and torch.allclose(fitted.bias, codec.bias, atol=1e-5)
    assert fitted.fit_rms < 1e-5
    z = smooth_latents(1, size=8, generator=g)[0, :, 0]
    f = latent_factors(family)
    for first, (shift, scale) in ((True, (f.image_shift, f.image_scale)), (False, (f.video_shift, f.video_scale))):
        expected = codec.rgb(z / scale + shift).clamp(0, 1).float()
        assert torch.allclose(fitted.to_rgb(z, family, first), expected, atol=1e-5), f"first_frame={first}"


@pytest.fixture(scope="module")
def tiny_codec():
    vae = load_vae(model_dir("miniflux_tiny"), dtype=torch.float32).model
    memory = MemoryManager(plan="none", device="cpu")
    memory.register("vae", vae)
    return LatentCodec(memory, "flux")


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).square().mean().sqrt())


def test_the_fitted_map_beats_the_channel_stretch_on_the_tiny_vae(tiny_codec):
    started = time.perf_counter()
    fitted = fit_latent_rgb(tiny_codec)  # the defaults the nodes use: 3 decodes of 16x16 latent pixels
    fit_seconds = time.perf_counter() - started
    held_out = smooth_latents(2, size=16, generator=torch.Generator().manual_seed(123), amplitudes=(1.0, 1.4))
    target = pooled_decode(tiny_codec, held_out)  # [2,16,16,3], the decode averaged over each 8x8 block
    fitted_error = rms(torch.stack([fitted.to_rgb(z[:, 0], "flux", True) for z in held_out]), target)
    baseline_error = rms(torch.stack([channel_stretch(z[:, 0]) for z in held_out]), target)
    print(f"fit {fit_seconds:.1f} s, held-out RMS {fitted_error:.4f} vs channel stretch {baseline_error:.4f}")
    assert fitted_error < 0.03, fitted_error
    assert fitted_error < 0.2 * baseline_error, (fitted_error, baseline_error)


def sample_small(model, cond, **extra):
    return M["PyramidFlowCoreSampler"]().sample(model, cond, 64, 64, 2, 0.0, "1, 1, 1", "1, 1, 1", 7.0, 5.0, 3,
                                                **extra)[0]


def load(name="pyramid-flow-miniflux", offload="auto"):
    return M["PyramidFlowCoreModelLoader"]().load(name, "384p", "fp32", offload, 0.0, 0, "segmented")


def previews_of(run) -> list[Image.Image]:
    import comfy.utils as utils

    images = []
    utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: preview and images.append(preview))
    try:
        result = run()
    finally:
        utils.set_progress_bar_global_hook(None)
    assert all(p[0] == "JPEG" and p[2] == 512 for p in images)
    return [p[1] for p in images], result


def test_sampler_previews_the_newest_frame_in_colour_from_the_folders_vae(comfy, monkeypatch):
    from nodes import preview

    model, vae, text_encoder = load()  # previews are on: the loader fitted the map of the folder's VAE
    rgb = getattr(vae, preview.RGB_ATTR)
    assert getattr(model, preview.MODEL_VAE_ATTR) is vae and rgb is not None
    assert any(e[0] == "load" and e[1] == "CausalVideoVAE" for e in comfy.EVENTS), "the fit went through ComfyUI's loader"
    fits = []
    monkeypatch.setattr(preview, "fit_latent_rgb", lambda *a, **k: fits.append(1))
    assert preview.rgb_map(vae) is rgb and not fits, "a VAE value is fitted once"

    cond = M["PyramidFlowCoreTextEncode"]().encode(PROMPT, "", True, False, text_encoder, None)[0]
    comfy.EVENTS.clear()
    images, latent = previews_of(lambda: sample_small(model, cond))
    assert not any(e[0] == "load" and e[1] == "CausalVideoVAE" for e in comfy.EVENTS), "no VAE work while sampling"
    samples = latent["samples"]
    assert len(images) == samples.shape[2] == 2
    for index, image in enumerate(images):  # one per latent frame, the newest one, through the fitted map
        assert image.mode == "RGB" and image.size == (samples.shape[-1], samples.shape[-2])
        expected = (rgb.to_rgb(samples[0, :, index], "flux", first_frame=index == 0) * 255).round().to(torch.uint8)
        assert torch.equal(torch.from_numpy(np.array(image)), expected)
        stretched = (channel_stretch(samples[0, :, index]) * 255).round().to(torch.uint8)
        assert not torch.equal(expected, stretched)


def test_the_vae_input_colours_previews_and_without_any_vae_the_fallback_remains(comfy):
    from nodes import preview

    model, vae, text_encoder = load()
    cond = M["PyramidFlowCoreTextEncode"]().encode(PROMPT, "", True, False, text_encoder, None)[0]
    delattr(model, preview.MODEL_VAE_ATTR)  # as a single-file DiT: no folder VAE
    bare, latent = previews_of(lambda: sample_small(model, cond))
    newest = latent["samples"][0, :, -1]
    assert torch.equal(torch.from_numpy(np.array(bare[-1])), (channel_stretch(newest) * 255).round().to(torch.uint8))
    wired, latent = previews_of(lambda: sample_small(model, cond, vae=vae))
    rgb = getattr(vae, preview.RGB_ATTR)
    expected = (rgb.to_rgb(latent["samples"][0, :, -1], "flux", False) * 255).round().to(torch.uint8)
    assert torch.equal(torch.from_numpy(np.array(wired[-1])), expected)


# ------------------------------------------------------------------------------------ tooltips


def test_every_input_of_every_node_has_a_tooltip():
    missing = []
    for key, cls in M.items():
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, entry in spec.get(section, {}).items():
                options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
                if not str(options.get("tooltip", "")).strip():
                    missing.append(f"{key}.{name}")
    assert missing == []


# ---------------------------------------------------------------------------------- thumbnails


def test_every_workflow_has_a_small_jpg_thumbnail_beside_it():
    workflows = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    assert sorted(THUMBNAILS) == workflows, "add a title card for the new workflow and run python -m tools.thumbnails"
    for name in workflows:
        path = WORKFLOWS / f"{name}.jpg"
        assert path.is_file(), f"{path.name} is missing"
        assert path.stat().st_size < THUMBNAIL_BYTES, f"{path.name} is {path.stat().st_size} bytes"
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.size == THUMBNAIL_SIZE and image.mode == "RGB"


# ------------------------------------------------------------------------ "(none found)" entries


def test_the_none_found_entries_say_what_to_install_where(comfy, tmp_path):
    import folder_paths

    from nodes import comfy as gateway
    from nodes.loaders import NO_MODEL, NO_VAE

    folder_paths.set_base(str(tmp_path))  # an install with no models at all
    gateway.register_model_folders()
    (choice,) = M["PyramidFlowCoreModelLoader"].INPUT_TYPES()["required"]["model"][0]
    assert choice == NO_MODEL
    with pytest.raises(FileNotFoundError) as error:
        load(choice)
    message = str(error.value)
    assert message.startswith("no model installed: put an official Pyramid Flow folder") and "(none found)" not in message
    assert str(tmp_path / "models" / "pyramidflow") in message and str(tmp_path / "models" / "diffusion_models") in message
    (vae_choice,) = M["PyramidFlowCoreVAELoader"].INPUT_TYPES()["required"]["vae"][0]
    assert vae_choice == NO_VAE
    with pytest.raises(FileNotFoundError) as error:
        M["PyramidFlowCoreVAELoader"]().load(vae_choice, "bf16", "miniflux")
    message = str(error.value)
    assert message.startswith("no VAE installed: put pyramid_flow_vae_bf16.safetensors") and "(none found)" not in message
    assert str(tmp_path / "models" / "vae") in message


# ------------------------------------------------------------------ one rule for temp beyond training


def test_the_sampler_node_and_the_command_line_warn_alike_beyond_the_trained_length():
    from nodes.sampler import pick_temp
    from pyramid_core import cli

    variant = "diffusion_transformer_384p"
    expected = temp_beyond_training(20, variant)
    assert expected is not None and temp_beyond_training(16, variant) is None
    with warnings.catch_warnings(record=True) as node_warnings:
        warnings.simplefilter("always")
        assert pick_temp(variant, 20, 0.0) == 20  # warns and runs
    args = cli.build_parser().parse_args(["generate", "--prompt", PROMPT, "--model", str(model_dir("miniflux_tiny")),
                                          "--temp", "20", "--width", "64", "--height", "64", "--out", "x.mp4"])
    with warnings.catch_warnings(record=True) as cli_warnings:
        warnings.simplefilter("always")
        assert cli.resolve_request(args).temp == 20  # warns and runs
    assert [str(w.message) for w in node_warnings] == [expected]
    assert expected in [str(w.message) for w in cli_warnings]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pick_temp(variant, 16, 0.0)  # within the trained length: silent
