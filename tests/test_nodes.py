"""The ComfyUI nodes on the tiny fixture checkpoints: standalone, and against the ComfyUI double
(model management, progress, interrupt, previews, folders, VIDEO), with official-parity checks."""
import gc
import importlib.util
import inspect
import sys
import weakref

import av
import numpy as np
import pytest
import torch

import nodes
from nodes import comfy as gateway
from pyramid_core.loading import load_dit, load_vae, save_single_file
from pyramid_core.pipeline import RandomStreams
from pyramid_core.text import DEFAULT_NEGATIVE_PROMPT
from tests.reference import REPO_ROOT, assert_frames_match, assert_matches, case, model_dir, tensors

PROMPT = "a cat walking on the beach at sunset"
KIJAI_KEYS = {
    "PyramidFlowSampler", "PyramidFlowVAEDecode", "PyramidFlowTextEncode", "PyramidFlowVAEEncode",
    "PyramidFlowTorchCompileSettings", "PyramidFlowTransformerLoader", "PyramidFlowVAELoader",
    "PyramidFlowLatentPreview", "DownloadAndLoadPyramidFlowModel",
}
M = nodes.NODE_CLASS_MAPPINGS


def load(name="pyramid-flow-miniflux", offload="auto", variant="384p"):
    return M["PyramidFlowCoreModelLoader"]().load(name, variant, "fp32", offload, 0.0, 0, "segmented")


def encode(text_encoder=None, clip=None, prompt=PROMPT):
    return M["PyramidFlowCoreTextEncode"]().encode(prompt, DEFAULT_NEGATIVE_PROMPT, True, False, text_encoder, clip)[0]


def sample(model, cond, seed=7, temp=3, **extra):
    return M["PyramidFlowCoreSampler"]().sample(model, cond, 64, 64, temp, 0.0, "2, 2, 2", "2, 2, 2", 7.0, 5.0, seed, **extra)[0]


def official_streams(monkeypatch, generator_seed, global_seed):
    """Make the node's `seed` reproduce a fixture run (generator seed and global seed differ there)."""
    monkeypatch.setattr(RandomStreams, "from_seed", classmethod(
        lambda cls, seed: cls(torch.Generator("cpu").manual_seed(generator_seed), None)))
    torch.manual_seed(global_seed)


# ------------------------------------------------------------------------------------ the pack


def test_pack_entry_point_imports_without_comfyui_and_keys_are_ours():
    spec = importlib.util.spec_from_file_location("ComfyUI_PyramidFlow_pack", REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pack
    try:
        spec.loader.exec_module(pack)
    finally:
        sys.modules.pop(spec.name, None)
    assert not gateway.HAVE_COMFY
    assert set(pack.NODE_CLASS_MAPPINGS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(M)
    assert not set(M) & KIJAI_KEYS and all(key.startswith("PyramidFlowCore") for key in M)
    for key, cls in M.items():
        spec = cls.INPUT_TYPES()
        params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
        names = [*spec.get("required", {}), *spec.get("optional", {})]
        assert all(name in params for name in names), key
        assert cls.CATEGORY == "PyramidFlow" and isinstance(cls.RETURN_TYPES, tuple)


# ------------------------------------------------------------------------ parity, standalone


def test_standalone_t2v_nodes_match_the_official_run(base, monkeypatch):
    monkeypatch.setenv(gateway.STANDALONE_MODELS_ENV, str(base / "models"))
    model, vae, text_encoder = load()
    cond = encode(text_encoder)
    reference = tensors("miniflux_tiny/text_encoding")
    tolerance = case("miniflux_tiny/text_encoding")["tolerance"]
    negative, positive = cond.embeddings.chunk_cfg()
    for part, emb in (("negative", negative), ("prompt", positive)):
        assert_matches(emb.prompt_embeds, reference[f"{part}.prompt_embeds"], tolerance, f"{part} embeds")
        assert_matches(emb.pooled, reference[f"{part}.pooled_prompt_embeds"], tolerance, f"{part} pooled")
        assert torch.equal(emb.attention_mask, reference[f"{part}.prompt_attention_mask"])

    expected, entry = tensors("miniflux_tiny/e2e/t2v"), case("miniflux_tiny/e2e/t2v")
    official_streams(monkeypatch, 1234, 4321)
    latent = sample(model, cond)
    assert latent["pyramidflow_family"] == "flux"
    assert_matches(latent["samples"], expected["latents"], entry["tolerance"]["latents"], "latents")
    (frames,) = M["PyramidFlowCoreVAEDecode"]().decode(vae, latent, "auto", "auto")
    assert frames.dtype == torch.float32 and frames.device.type == "cpu" and frames.shape == (17, 64, 64, 3)
    # IMAGE floats, quantised like the official decode (truncating), vs the official uint8 frames
    assert_frames_match((frames * 255).floor().to(torch.uint8), expected["frames"], "frames")


def test_standalone_i2v_from_start_image_matches_the_official_run(base, monkeypatch):
    monkeypatch.setenv(gateway.STANDALONE_MODELS_ENV, str(base / "models"))
    model, vae, text_encoder = load()
    expected, entry = tensors("miniflux_tiny/e2e/i2v"), case("miniflux_tiny/e2e/i2v")
    image = expected["input_image"].float()[None] / 255  # IMAGE [1,H,W,3]
    cond = encode(text_encoder)
    official_streams(monkeypatch, 2345, 5432)
    latent = sample(model, cond, start_image=image, vae=vae)
    assert_matches(latent["samples"], expected["latents"], entry["tolerance"]["latents"], "i2v latents")


# ---------------------------------------------------------------------------- CLIP (ComfyUI)


@pytest.mark.parametrize("model, kind", [("miniflux_tiny", "flux"), ("sd3_tiny", "sd3")])
def test_comfyui_clip_gives_the_official_text_conditioning(comfy, model, kind):
    from comfy.sd import CLIP

    clip = CLIP(model_dir(model), kind)
    cond = encode(clip=clip)
    assert cond.family == ("flux" if kind == "flux" else "mmdit")
    reference, tolerance = tensors(f"{model}/text_encoding"), case(f"{model}/text_encoding")["tolerance"]
    negative, positive = cond.embeddings.chunk_cfg()
    for part, emb in (("negative", negative), ("prompt", positive)):
        assert emb.prompt_embeds.shape == (1, 128, reference[f"{part}.prompt_embeds"].shape[-1])
        assert_matches(emb.prompt_embeds, reference[f"{part}.prompt_embeds"], tolerance, f"{part} embeds")
        assert_matches(emb.pooled, reference[f"{part}.pooled_prompt_embeds"], tolerance, f"{part} pooled")
        assert torch.equal(emb.attention_mask, reference[f"{part}.prompt_attention_mask"])
    t5 = clip.cond_stage_model.t5xxl
    assert (t5.enable_attention_masks, t5.return_attention_masks) == (False, False), "the shared CLIP must be restored"
    assert ("load", "_ClipModels", 0, False) in comfy.EVENTS and ("unload", "_ClipModels") in comfy.EVENTS


def test_long_prompts_are_cut_to_128_t5_tokens_like_the_official_tokenizer(comfy):
    from comfy.sd import CLIP

    long_prompt = " ".join(["a cat walking on the beach at sunset"] * 40)
    clip_cond = encode(clip=CLIP(model_dir("miniflux_tiny"), "flux"), prompt=long_prompt)
    own_cond = encode(text_encoder=load()[2], prompt=long_prompt)
    assert clip_cond.embeddings.attention_mask.sum(1).tolist() == own_cond.embeddings.attention_mask.sum(1).tolist()
    assert_matches(clip_cond.embeddings.prompt_embeds, own_cond.embeddings.prompt_embeds, {"rtol": 5e-5, "atol": 1e-6})
    assert_matches(clip_cond.embeddings.pooled, own_cond.embeddings.pooled, {"rtol": 5e-5, "atol": 1e-6})


# ------------------------------------------------------------- ComfyUI owns the models (double)


def test_comfyui_manages_loads_progress_previews_and_frees(comfy, base):
    import comfy.utils as utils

    model, vae, text_encoder = load()
    for managed in (model.dit, vae.vae):
        module = managed.module
        assert managed.patcher.model_size() == sum(t.nbytes for t in module.state_dict().values())
        assert managed.patcher.load_device == comfy.get_torch_device()
        assert managed.patcher.offload_device == comfy.unet_offload_device()
    cond = encode(text_encoder)
    assert ("unload", "PyramidTextEncoder") in comfy.EVENTS, "the text encoder is released after encoding"
    comfy.EVENTS.clear()

    latent = sample(model, cond)
    loads = [e for e in comfy.EVENTS if e[0] == "load"]
    # offload auto: ComfyUI's loader decides (whole here, partially when short), asked for the working memory too
    assert loads == [("load", "PyramidFluxTransformer", loads[0][2], False)] and loads[0][2] > 0
    total = 3 * (2 + 2 + 2)  # three units (first frame + two video frames) of [2, 2, 2] steps
    steps = [u for u in utils.UPDATES if not u[2]]
    assert [u[0] for u in steps] == list(range(1, total + 1)) and {u[1] for u in steps} == {total}
    assert sum(u[2] for u in utils.UPDATES) == 3, "one preview per finished latent frame"
    assert sum(e == ("interrupt_check",) for e in comfy.EVENTS) >= total
    assert model.dit.patcher in comfy.loaded_models(), "mode auto on a fitting model: left loaded, as ComfyUI does"

    (frames,) = M["PyramidFlowCoreVAEDecode"]().decode(vae, latent, "auto", "auto")
    assert [e[:2] + e[3:] for e in comfy.EVENTS if e[:2] == ("load", "CausalVideoVAE")] == [("load", "CausalVideoVAE", False)]
    comfy.unload_all_models()  # what "Unload models" / POST /free does
    assert comfy.loaded_models() == []
    assert {("unload", "PyramidFluxTransformer"), ("unload", "CausalVideoVAE")} <= set(comfy.EVENTS)

    dit_ref = weakref.ref(model.dit.module)
    del model, vae, text_encoder, cond, latent, frames
    gc.collect()
    assert dit_ref() is None, "the pack must keep no reference to a model once ComfyUI drops the node outputs"


def test_offload_model_mode_unloads_after_use(comfy):
    model, _, text_encoder = load(offload="model")
    sample(model, encode(text_encoder))
    assert ("unload", "PyramidFluxTransformer") in comfy.EVENTS and comfy.loaded_models() == []


@pytest.mark.parametrize("offload", ["block_swap", "sequential"])
def test_streaming_offload_gives_the_same_video_and_leaves_nothing_loaded(comfy, offload):
    model, _, text_encoder = load()
    cond = encode(text_encoder)
    reference = sample(model, cond, seed=5, temp=2)["samples"]
    streamed_model = load(offload=offload)[0]
    comfy.EVENTS.clear()
    streamed = sample(streamed_model, cond, seed=5, temp=2)["samples"]
    assert torch.equal(streamed, reference)
    assert not any(e[0] == "load" for e in comfy.EVENTS), "streaming bypasses load_models_gpu"
    assert streamed_model.dit.patcher not in comfy.loaded_models()
    assert all(p.device.type == "cpu" for p in streamed_model.dit.module.parameters())


def test_cancel_stops_within_one_step_and_leaves_models_usable(comfy):
    import comfy.utils as utils

    model, _, text_encoder = load()
    cond = encode(text_encoder)
    reference = sample(model, cond, seed=3, temp=2)["samples"]
    calls = []
    handle = model.dit.module.register_forward_hook(lambda *args: calls.append(1))
    stop_at = 5

    def cancel_at(value, total, preview, node_id=None):
        if value == stop_at and preview is None:
            comfy.interrupt_current_processing()

    utils.set_progress_bar_global_hook(cancel_at)
    try:
        with pytest.raises(comfy.InterruptProcessingException):
            sample(model, cond, seed=3, temp=2)
        assert len(calls) == stop_at, f"{len(calls)} DiT calls after a cancel at step {stop_at}"
    finally:
        handle.remove()
        utils.set_progress_bar_global_hook(None)
    assert not comfy.processing_interrupted()
    assert torch.equal(sample(model, cond, seed=3, temp=2)["samples"], reference), "models stay loaded and usable"


# --------------------------------------------------------------------------- save, VAE, inputs


def read_video(path):
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return np.stack(frames)


def test_save_video_writes_numbered_files_shows_them_and_cancel_writes_nothing(comfy, base):
    y, x = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 96), indexing="ij")
    frames = torch.stack([torch.stack([x, y, (x + y + t / 9) % 1], -1) for t in range(9)])  # smooth: survives 4:2:0
    saver = M["PyramidFlowCoreSaveVideo"]()
    first = saver.save(frames, 24.0, "mp4", 80, "tests/clip")
    second = saver.save(frames, 24.0, "mp4", 80, "tests/clip")
    names = [out["ui"]["images"][0]["filename"] for out in (first, second)]
    assert names == ["clip_00001_.mp4", "clip_00002_.mp4"]
    assert first["ui"]["images"][0]["subfolder"] == "tests" and first["ui"]["animated"] == (True,)
    decoded = read_video(base / "output" / "tests" / names[0])
    assert decoded.shape == (9, 64, 96, 3)
    assert np.abs(decoded.astype(float) - frames.numpy() * 255).mean() < 6  # lossy, but the same picture
    video = first["result"][0]
    assert video.get_frame_count() == 9 and video.get_frame_rate() == 24
    comfy.interrupt_current_processing()
    with pytest.raises(comfy.InterruptProcessingException):
        saver.save(frames, 24.0, "webm", 80, "tests/cancelled")
    assert not list((base / "output" / "tests").glob("cancelled*")), "a cancelled save leaves no file"


def test_vae_encode_and_start_latent_image_to_video(comfy):
    model, vae, text_encoder = load()
    image = torch.rand(1, 64, 64, 3)
    (latent,) = M["PyramidFlowCoreVAEEncode"]().encode(vae, image)
    assert latent["samples"].shape == (1, 16, 1, 8, 8) and latent["pyramidflow_family"] == "flux"
    (video_latent,) = M["PyramidFlowCoreVAEEncode"]().encode(vae, torch.rand(17, 64, 64, 3))
    assert video_latent["samples"].shape == (1, 16, 3, 8, 8)
    out = sample(model, encode(text_encoder), start_latent=latent)["samples"]
    assert out.shape == (1, 16, 3, 8, 8) and torch.equal(out[:, :, :1], latent["samples"].to(out.dtype))


def test_vae_decode_reports_progress_and_follows_the_latent_family(comfy):
    import comfy.utils as utils
    from nodes.managed import FAMILY_KEY
    from pyramid_core.latent_format import denormalize_latents, frames_to_float

    _, vae, _ = load()
    latents = 2 * torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    utils.UPDATES.clear()
    (frames,) = M["PyramidFlowCoreVAEDecode"]().decode(vae, {"samples": latents}, "auto", "auto")
    # decode steps (one 64x64 tile x chunks of 2 latent frames and none after), total known up front
    assert utils.UPDATES == [(0, 1, False), (1, 1, False)]
    expected = vae.vae.module.decode(denormalize_latents(latents, "flux"), window_size=1, tile_sample_min_size=256)
    assert frames.shape == (9, 64, 64, 3) and torch.equal(frames, frames_to_float(expected))
    (as_sd3,) = M["PyramidFlowCoreVAEDecode"]().decode(vae, {"samples": latents, FAMILY_KEY: "mmdit"}, "auto", "auto")
    assert not torch.equal(as_sd3[0], frames[0]), "the LATENT's family picks the first-frame factors"


def test_single_files_are_listed_and_loaded(comfy, base, tmp_path):
    import folder_paths

    dit_file = save_single_file(load_dit(model_dir("miniflux_tiny")), base / "models" / "diffusion_models" / "pf_tiny.safetensors")
    vae_file = save_single_file(load_vae(model_dir("miniflux_tiny")), base / "models" / "vae" / "pf_vae_tiny.safetensors")
    try:
        assert "diffusion_models/pf_tiny.safetensors" in M["PyramidFlowCoreModelLoader"].INPUT_TYPES()["required"]["model"][0]
        model, vae, text_encoder = load("diffusion_models/pf_tiny.safetensors")
        assert vae is None and text_encoder is None and model.family == "flux"
        (single_vae,) = M["PyramidFlowCoreVAELoader"]().load("pf_vae_tiny.safetensors", "fp32", "miniflux")
        assert single_vae.family == "flux"
        assert "pyramidflow" in folder_paths.folder_names_and_paths
    finally:
        dit_file.unlink()
        vae_file.unlink()


def test_bad_input_gets_errors_that_name_the_fix(comfy, base, tmp_path):
    import folder_paths

    model, vae, text_encoder = load()
    cond = encode(text_encoder)
    sampler = M["PyramidFlowCoreSampler"]()
    from nodes.sampler import pick_temp

    # one rule everywhere: past the trained length runs, with a warning (as the command line and pipeline do)
    with pytest.warns(UserWarning, match=r"beyond what diffusion_transformer_384p was trained for \(temp <= 16"):
        assert pick_temp(model.variant, 20, 0.0) == 20
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0"):
        sampler.sample(model, cond, 64, 64, 2, 0.0, "1", "1", float("nan"), 5.0, 0)
    with pytest.raises(ValueError, match="multiple of 64"):
        sampler.sample(model, cond, 100, 64, 2, 0.0, "1", "1", 7.0, 5.0, 0)
    with pytest.raises(ValueError, match="needs the vae"):
        sampler.sample(model, cond, 64, 64, 2, 0.0, "1", "1", 7.0, 5.0, 0, start_image=torch.rand(1, 64, 64, 3))
    sd3_cond = encode(load("pyramid-flow-sd3")[2])
    with pytest.raises(ValueError, match="made for SD3 but the model is miniFLUX"):
        sampler.sample(model, sd3_cond, 64, 64, 2, 0.0, "1", "1", 7.0, 5.0, 0)
    with pytest.raises(ValueError, match="exactly one of text_encoder"):
        encode()

    folder_paths.set_base(str(tmp_path))  # an install with no models at all
    gateway.register_model_folders()
    choices = M["PyramidFlowCoreModelLoader"].INPUT_TYPES()["required"]["model"][0]
    assert len(choices) == 1 and "models/pyramidflow/" in choices[0]
    with pytest.raises(FileNotFoundError, match="pyramidflow"):
        load(choices[0])


@pytest.mark.parametrize("precision, attention", [("fp8", "segmented"), ("fp16", "masked"), ("bf16", "flex")])
def test_loader_precisions_and_attention_choices_run(comfy, precision, attention):
    from pyramid_core.precision import has_fp8_weights

    model, vae, text_encoder = M["PyramidFlowCoreModelLoader"]().load(
        "pyramid-flow-miniflux", "384p", precision, "none", 0.0, 0, attention)
    assert has_fp8_weights(model.dit.module) == (precision == "fp8")
    assert model.dit.module.attention_mode == attention
    latents = sample(model, encode(text_encoder), temp=2)["samples"]
    assert torch.isfinite(latents.float()).all()
    frames = M["PyramidFlowCoreVAEDecode"]().decode(vae, {"samples": latents}, "auto", "auto")[0]
    assert frames.shape == (9, 64, 64, 3) and torch.isfinite(frames).all()


def test_loader_names_a_missing_attention_library(comfy, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "sageattention", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install sageattention"):
        M["PyramidFlowCoreModelLoader"]().load("pyramid-flow-miniflux", "384p", "bf16", "none", 0.0, 0, "sage")


# ------------------------------------------------------------- continuing a clip, prompt schedules

ONE_STEP = "1, 1, 1"


def sample_fast(model, cond, temp=2, seed=11, guidance=7.0, **extra):
    """The sampler at 64x64 with one step per stage (continuations and schedules)."""
    return M["PyramidFlowCoreSampler"]().sample(model, cond, 64, 64, temp, 0.0, ONE_STEP, ONE_STEP, guidance, 5.0, seed,
                                                **extra)[0]


def bare_pipeline(model):
    from pyramid_core.pipeline import PyramidFlowPipeline

    return PyramidFlowPipeline(model.dit.module, None, None, model.family, model.variant, model.dtype)


def test_history_continues_a_clip_by_temp_frames_and_outputs_the_whole_clip(comfy):
    import comfy.utils as utils
    from nodes.managed import FAMILY_KEY

    model, vae, text_encoder = load()
    cond = encode(text_encoder)
    first = sample_fast(model, cond)
    utils.UPDATES.clear()
    clip = sample_fast(model, cond, temp=1, seed=12, history=first)
    assert clip[FAMILY_KEY] == "flux" and clip["samples"].shape == (1, 16, 3, 8, 8)
    assert torch.equal(clip["samples"][:, :, :2], first["samples"]), "the history is output unchanged"
    # the node is pipe.extend with the same settings: new units use video_steps and video guidance
    expected = bare_pipeline(model).extend(first["samples"], prompt_embeds=cond.embeddings, temp=1,
                                           num_inference_steps=[1, 1, 1], guidance_scale=7.0, video_guidance_scale=5.0,
                                           seed=12)
    assert torch.equal(clip["samples"], expected)
    steps = [u for u in utils.UPDATES if not u[2]]
    assert [u[:2] for u in steps] == [(1, 3), (2, 3), (3, 3)], "one bar over the new frame's steps only"
    assert sum(u[2] for u in utils.UPDATES) == 1, "one preview per new latent frame"

    (encoded,) = M["PyramidFlowCoreVAEEncode"]().encode(vae, torch.rand(9, 64, 64, 3))  # a video from VAE Encode
    from_video = sample_fast(model, cond, temp=1, history=encoded)["samples"]
    assert from_video.shape == (1, 16, 3, 8, 8) and torch.equal(from_video[:, :, :2], encoded["samples"])
    capped = sample_fast(model, cond, temp=1, history=encoded, history_frames=1)["samples"]
    assert torch.equal(capped, bare_pipeline(model).extend(
        encoded["samples"], prompt_embeds=cond.embeddings, temp=1, num_inference_steps=[1, 1, 1], guidance_scale=7.0,
        video_guidance_scale=5.0, seed=11, history_frames=1))
    assert not torch.equal(capped[:, :, 2], from_video[:, :, 2]), "history_frames 0 is the whole history"


def test_bad_history_input_names_what_to_connect(comfy):
    from nodes.managed import FAMILY_KEY

    model, _, text_encoder = load()
    cond = encode(text_encoder)
    clip = {"samples": torch.zeros(1, 16, 2, 8, 8), FAMILY_KEY: "flux"}
    with pytest.raises(ValueError, match=r"history was made for SD3 \(pyramidflow_family='mmdit'\) but the model is "
                                         r"miniFLUX: connect a latent from a miniFLUX sampler or VAE Encode"):
        sample_fast(model, cond, history={**clip, FAMILY_KEY: "mmdit"})
    with pytest.raises(ValueError, match="history is 96x64; set width to 96 and height to 64"):
        sample_fast(model, cond, history={"samples": torch.zeros(1, 16, 2, 8, 12)})
    for samples in (torch.zeros(1, 4, 2, 8, 8), torch.zeros(1, 16, 8, 8)):
        with pytest.raises(ValueError, match=r"history must be a Pyramid Flow latent clip \[1,16,T,h,w\]: connect the "
                                             r"samples of a Pyramid Flow Sampler or of Pyramid Flow VAE Encode"):
            sample_fast(model, cond, history={"samples": samples})
    with pytest.raises(ValueError, match="history holds a batch of 2 clips; connect one clip"):
        sample_fast(model, cond, history={"samples": torch.zeros(2, 16, 2, 8, 8)})
    for start in ({"start_latent": {"samples": torch.zeros(1, 16, 1, 8, 8)}}, {"start_image": torch.rand(1, 64, 64, 3)}):
        with pytest.raises(ValueError, match="connect one of them: history continues a clip, start_image / start_latent"):
            sample_fast(model, cond, history=clip, **start)
    schedule = encode(text_encoder, prompt="0: a cat | 3: a dog")
    with pytest.raises(ValueError, match="'3: a dog' starts at latent frame 3, but the video has 2 .*raise temp"):
        sample_fast(model, schedule)
    with pytest.raises(ValueError, match="history_frames must be an integer >= 0"):
        sample_fast(model, cond, history=clip, history_frames=-1)
    spec = M["PyramidFlowCoreSampler"].INPUT_TYPES()["optional"]
    assert all(spec[name][1]["tooltip"] for name in ("history", "history_frames"))
    assert spec["history_frames"][1]["default"] == 0


def test_a_one_entry_schedule_gives_the_plain_prompts_latents_bit_for_bit(comfy):
    model, _, text_encoder = load()
    plain = encode(text_encoder, prompt="a cat")
    scheduled = encode(text_encoder, prompt="0: a cat")
    assert not plain.is_scheduled and scheduled.is_scheduled
    assert callable(scheduled.for_units(2)), "the sampler takes the per-unit path"
    assert torch.equal(scheduled.embeddings.prompt_embeds, plain.embeddings.prompt_embeds)
    for guidance in (7.0, 0.0):
        expected = sample_fast(model, plain, guidance=guidance)["samples"]
        assert torch.equal(sample_fast(model, scheduled, guidance=guidance)["samples"], expected)


def test_a_schedule_changes_the_prompt_at_its_frame_also_when_continuing(comfy):
    model, _, text_encoder = load()
    cat, dog = encode(text_encoder, prompt="a cat"), encode(text_encoder, prompt="a dog")
    cond = encode(text_encoder, prompt="0: a cat | 2: a dog")
    assert list(cond.scheduled) == [("a cat", DEFAULT_NEGATIVE_PROMPT), ("a dog", DEFAULT_NEGATIVE_PROMPT)]
    assert torch.equal(cond.at(1).prompt_embeds, cat.embeddings.prompt_embeds)
    assert torch.equal(cond.at(5).pooled, dog.embeddings.pooled)
    plain = sample_fast(model, cat, temp=3)["samples"]
    changed = sample_fast(model, cond, temp=3)["samples"]
    assert torch.equal(changed[:, :, :2], plain[:, :, :2]) and not torch.equal(changed[:, :, 2], plain[:, :, 2])
    # continuing: starts count from the clip's first frame, so frame 2 (the first new one) is the dog
    history = {"samples": plain[:, :, :2]}
    assert torch.equal(sample_fast(model, cond, temp=1, history=history)["samples"],
                       sample_fast(model, dog, temp=1, history=history)["samples"])


def test_schedules_through_a_comfyui_clip_and_in_the_negative_prompt(comfy):
    from comfy.sd import CLIP

    from nodes.managed import PyramidFlowConditioning
    from pyramid_core.schedules import PromptSchedule

    clip = CLIP(model_dir("miniflux_tiny"), "flux")
    text = M["PyramidFlowCoreTextEncode"]()
    (cond,) = text.encode("0: a cat | 4: a dog", "0: blurry | 2: dark", True, False, None, clip)
    assert list(cond.scheduled) == [("a cat", "blurry"), ("a cat", "dark"), ("a dog", "dark")]
    (alone,) = text.encode("a dog", "dark", True, False, None, clip)
    assert torch.equal(cond.scheduled[("a dog", "dark")].prompt_embeds, alone.embeddings.prompt_embeds)
    positive = cond.for_units(5, cfg=False)
    assert positive(4).batch_size == 1 and positive(4) is positive(6)
    assert torch.equal(positive(3).pooled, cond.scheduled[("a cat", "dark")].chunk_cfg()[1].pooled)
    assert PyramidFlowConditioning.schedules("a cat: sleeping", "blurry") is None, "not the schedule form"
    late_negative = PyramidFlowConditioning(None, "flux", PromptSchedule.parse("0: a"), PromptSchedule.parse("0: n | 2: b"))
    with pytest.raises(ValueError, match="'2: b' starts at latent frame 2, but the video has 2"):
        late_negative.for_units(2)
    with pytest.raises(ValueError, match="prompt schedule entry 'b' is not '<latent frame>: <text>'"):
        text.encode("0: a | b", "", True, False, None, clip)
