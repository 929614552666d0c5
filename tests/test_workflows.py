"""Every example workflow is valid for the nodes as defined and runs end to end on the tiny model."""
import json

import av
import pytest

import nodes
from tests import comfy_double
from tests.reference import REPO_ROOT
from tests.helpers import make_base

WORKFLOWS = sorted((REPO_ROOT / "workflows").glob("*.json"))
# the tiny checkpoint is 64x64 with short videos: shrink only size, length and steps
TINY = {"width": 64, "height": 64, "temp": 2, "seconds": 0.0, "first_frame_steps": "1, 1, 1", "video_steps": "1, 1, 1"}


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    base = make_base(tmp_path_factory.mktemp("workflow_base"))
    comfy_double.install(base)
    from stock_nodes import STOCK_NODE_CLASS_MAPPINGS

    import workflow

    yield base, {**nodes.NODE_CLASS_MAPPINGS, **STOCK_NODE_CLASS_MAPPINGS}, workflow
    comfy_double.uninstall()


def test_the_five_example_workflows_exist():
    names = {path.stem for path in WORKFLOWS}
    assert names == {"pyramid_flow_t2v_384p", "pyramid_flow_t2v_768p_low_vram", "pyramid_flow_i2v_384p",
                     "pyramid_flow_t2v_384p_upscale", "pyramid_flow_t2v_384p_extend"}


def test_the_extend_workflow_continues_the_first_clip_with_a_new_prompt(comfy):
    _, mappings, workflow = comfy
    prompt = workflow.to_api(json.loads((REPO_ROOT / "workflows" / "pyramid_flow_t2v_384p_extend.json").read_text()), mappings)
    samplers = {node_id: node["inputs"] for node_id, node in prompt.items() if node["class_type"] == "PyramidFlowCoreSampler"}
    (first_id, first), (second_id, second) = sorted(samplers.items())
    assert second["history"] == [first_id, 0] and "history" not in first
    assert (first["temp"], second["temp"], second["width"], second["height"]) == (16, 15, 640, 384)  # 5 s + 5 s = 241 frames
    texts = [prompt[inputs["conditioning"][0]]["inputs"]["prompt"] for inputs in (first, second)]
    assert texts[0] != texts[1], "the continuation has its own prompt"
    (decode,) = [n for n in prompt.values() if n["class_type"] == "PyramidFlowCoreVAEDecode"]
    assert decode["inputs"]["samples"] == [second_id, 0], "the whole clip is decoded"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_is_valid_for_the_nodes_as_defined(comfy, path):
    _, mappings, workflow = comfy
    ui = json.loads(path.read_text())
    assert ui["version"] == 0.4 and ui["last_node_id"] == max(n["id"] for n in ui["nodes"])
    assert workflow.validate(ui, mappings) == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_end_to_end_on_the_tiny_model(comfy, path):
    base, mappings, workflow = comfy
    prompt = workflow.to_api(json.loads(path.read_text()), mappings)
    for node in prompt.values():
        if node["class_type"] == "PyramidFlowCoreSampler":
            node["inputs"].update(TINY)
        if node["class_type"] == "PyramidFlowCoreModelLoader":
            node["inputs"]["precision"] = "fp32"  # bf16 matmuls are slow on CPUs
    outputs = workflow.execute(prompt, mappings)
    (saved,) = [ui["images"][0] for ui in outputs.values()]
    video = base / "output" / saved["subfolder"] / saved["filename"]
    with av.open(str(video)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    scale = 2 if "upscale" in path.stem else 1
    continuations = sum("history" in node["inputs"] for node in prompt.values())
    latent_frames = TINY["temp"] * (1 + continuations)  # a sampler with history adds temp latent frames
    assert len(frames) == 8 * (latent_frames - 1) + 1 and frames[0].shape == (64 * scale, 64 * scale, 3)
    assert saved["filename"].endswith(".mp4")
