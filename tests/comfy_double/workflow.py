"""UI-format workflow tools: validate against node classes, convert to API format, execute a graph.

The widget rules follow ComfyUI's frontend: widgets are the INT/FLOAT/STRING/BOOLEAN/combo inputs in
INPUT_TYPES order (required, then optional); an INT named `seed` is followed by its
control_after_generate value, a combo with `image_upload` by the upload button's value.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
SEED_CONTROLS = ("fixed", "increment", "decrement", "randomize")


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def _inputs(cls) -> list[tuple[str, tuple]]:
    spec = cls.INPUT_TYPES()
    return list(spec.get("required", {}).items()) + list(spec.get("optional", {}).items())


def _is_widget(spec: tuple) -> bool:
    kind = spec[0]
    options = spec[1] if len(spec) > 1 else {}
    return isinstance(kind, (list, tuple)) or (kind in WIDGET_TYPES and not options.get("forceInput"))


def widget_layout(cls) -> list[tuple[str, tuple | None]]:
    """(name, spec) per widgets_values slot; spec None marks a frontend-only slot (seed control, upload)."""
    layout = []
    for name, spec in _inputs(cls):
        if not _is_widget(spec):
            continue
        layout.append((name, spec))
        options = spec[1] if len(spec) > 1 else {}
        if (spec[0] == "INT" and name in ("seed", "noise_seed")) or options.get("control_after_generate"):
            layout.append((name + ".control", None))
        elif options.get("image_upload"):
            layout.append((name + ".upload", None))
    return layout


def widget_values(cls, values: list) -> dict[str, Any]:
    layout = widget_layout(cls)
    if len(values) != len(layout):
        raise ValueError(f"{cls.__name__}: {len(values)} widget values for {len(layout)} widgets {[n for n, _ in layout]}")
    return {name: value for (name, spec), value in zip(layout, values) if spec is not None}


def _check_value(name: str, spec: tuple, value: Any) -> str | None:
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    if isinstance(kind, (list, tuple)):
        return None if value in kind else f"{name}={value!r} is not one of {list(kind)}"
    ok = {
        "INT": isinstance(value, int) and not isinstance(value, bool),
        "FLOAT": isinstance(value, (int, float)) and not isinstance(value, bool),
        "STRING": isinstance(value, str),
        "BOOLEAN": isinstance(value, bool),
    }[kind]
    if not ok:
        return f"{name}={value!r} is not a {kind}"
    if kind in ("INT", "FLOAT") and not options.get("min", value) <= value <= options.get("max", value):
        return f"{name}={value!r} is outside {options.get('min')}..{options.get('max')}"
    return None


def validate(ui: dict, mappings: dict) -> list[str]:
    """Every problem found: unknown node types, widget count/type/range, seeds not fixed, link types."""
    problems: list[str] = []
    nodes = {node["id"]: node for node in ui["nodes"]}
    for node in ui["nodes"]:
        cls = mappings.get(node["type"])
        where = f"node {node['id']} ({node['type']})"
        if cls is None:
            problems.append(f"{where}: unknown node type")
            continue
        layout = widget_layout(cls)
        values = node.get("widgets_values", [])
        if len(values) != len(layout):
            problems.append(f"{where}: {len(values)} widget values, expected {len(layout)} ({[n for n, _ in layout]})")
            continue
        for (name, spec), value in zip(layout, values):
            if spec is not None:
                problem = _check_value(name, spec, value)
            elif name.endswith(".control"):
                problem = None if value == "fixed" else f"{name} is {value!r}; ship seeds as 'fixed'"
            else:
                problem = None
            if problem:
                problems.append(f"{where}: {problem}")
        declared = dict(_inputs(cls))
        for slot in node.get("inputs", []):
            spec = declared.get(slot["name"])
            if spec is None or _is_widget(spec):
                problems.append(f"{where}: input {slot['name']!r} is not a link input of {node['type']}")
            elif spec[0] != slot["type"]:
                problems.append(f"{where}: input {slot['name']} is {slot['type']}, declared {spec[0]}")
        for index, slot in enumerate(node.get("outputs", [])):
            if index >= len(cls.RETURN_TYPES) or cls.RETURN_TYPES[index] != slot["type"]:
                problems.append(f"{where}: output {index} {slot['type']} does not match RETURN_TYPES {cls.RETURN_TYPES}")
        required = [n for n, s in cls.INPUT_TYPES().get("required", {}).items() if not _is_widget(s)]
        linked = {slot["name"] for slot in node.get("inputs", []) if slot.get("link") is not None}
        problems += [f"{where}: required input {name!r} is not connected" for name in required if name not in linked]
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        if src not in nodes or dst not in nodes:
            problems.append(f"link {link_id}: unknown node")
            continue
        out = nodes[src]["outputs"][src_slot]
        slot = nodes[dst]["inputs"][dst_slot]
        if not (out["type"] == slot["type"] == kind):
            problems.append(f"link {link_id}: {out['type']} -> {slot['type']} labelled {kind}")
        if slot.get("link") != link_id or link_id not in (out.get("links") or []):
            problems.append(f"link {link_id}: not recorded on both nodes")
    return problems


def to_api(ui: dict, mappings: dict) -> dict:
    """API-format prompt (what POST /prompt takes) from a UI-format workflow."""
    links = {link[0]: link for link in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        if node.get("mode", 0) != 0:
            continue
        inputs = widget_values(mappings[node["type"]], node.get("widgets_values", []))
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, src, src_slot, _, _, _ = links[slot["link"]]
                inputs[slot["name"]] = [str(src), src_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs, "_meta": {"title": node.get("title", node["type"])}}
    return prompt


def _hidden(cls, prompt: dict, extra_data: dict, node_id: str) -> dict[str, Any]:
    values = {"PROMPT": prompt, "EXTRA_PNGINFO": extra_data.get("extra_pnginfo"), "UNIQUE_ID": node_id}
    return {name: values[kind] for name, kind in cls.INPUT_TYPES().get("hidden", {}).items() if kind in values}


def execute(prompt: dict, mappings: dict, extra_data: dict | None = None) -> dict[str, Any]:
    """Run every output node of an API prompt (dependencies first); returns each output node's `ui`.

    `extra_data` (what POST /prompt sends beside the prompt, e.g. {"extra_pnginfo": {"workflow": ui}}): when
    given, hidden inputs are filled as ComfyUI's executor does (PROMPT, EXTRA_PNGINFO, UNIQUE_ID)."""
    results: dict[str, tuple] = {}
    ui_outputs: dict[str, Any] = {}

    def run(node_id: str) -> tuple:
        if node_id not in results:
            node = prompt[node_id]
            cls = mappings[node["class_type"]]
            kwargs = {name: run(value[0])[value[1]] if isinstance(value, list) else value
                      for name, value in node["inputs"].items()}
            if extra_data is not None:
                kwargs.update(_hidden(cls, prompt, extra_data, node_id))
            out = getattr(cls(), cls.FUNCTION)(**kwargs)
            if isinstance(out, dict):
                ui_outputs[node_id] = out.get("ui")
                out = out.get("result", ())
            results[node_id] = tuple(out)
        return results[node_id]

    for node_id, node in prompt.items():
        if getattr(mappings[node["class_type"]], "OUTPUT_NODE", False):
            run(node_id)
    return ui_outputs
