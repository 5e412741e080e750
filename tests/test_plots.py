"""Plotly figures: what they show, that they serialise, and that Gradio's plotly.js can draw them.

Gradio 6.31 renders gr.Plot with the plotly.js bundled in its frontend (3.3.1), older than
the plotly.js that plotly 7 for Python targets (4.x), which added attributes 3.3.1 does not
know. Each figure's JSON is checked against the attribute names present in that bundle.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench.gates import HeldOutScore
from workbench.routing import RouterTrace, expert_load, plots, routing_entropy
from workbench.routing.analysis import Divergence, gate_similarity
from workbench.routing.trace import route

NAMES = ["org/coder", "org/mathematician", "org/storyteller", "demo:smollm2-135m-instruct"]


@functools.cache
def plotly_bundle() -> str:
    spec = importlib.util.find_spec("gradio")  # its folder, without importing gradio (seconds)
    assert spec is not None and spec.origin, "gradio is not installed"
    assets = Path(spec.origin).parent / "templates" / "frontend" / "assets"
    bundles = sorted(assets.glob("PlotlyPlot-*.js"))
    assert bundles, f"no plotly.js bundle in {assets}: has gradio's frontend layout changed?"
    return bundles[0].read_text(encoding="utf-8")


@functools.cache
def bundle_words() -> frozenset[str]:
    return frozenset(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", plotly_bundle()))


@functools.cache
def bundle_trace_types() -> frozenset[str]:
    return frozenset(re.findall(r"name:`(\w+)`,basePlotModule", plotly_bundle()))


def unknown_attributes(figure: dict) -> list[str]:
    """Key paths of a figure's JSON whose names the bundled plotly.js does not contain."""
    words, problems = bundle_words(), []

    def walk(value: object, path: str) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                name = re.sub(r"\d+$", "", key)  # xaxis2, yaxis2: numbered subplot axes
                # Template defaults for array items (annotationdefaults, shapedefaults) are
                # named at run time as item name + "defaults"; the item name is in the bundle.
                item = name[: -len("defaults")] if name.endswith("defaults") else None
                if name not in words and not (item and item in words):
                    problems.append(f"{path}.{key}")
                walk(child, f"{path}.{key}")
        elif isinstance(value, list):
            for item in value[:3]:  # arrays of objects repeat the same keys
                walk(item, path + "[]")

    for i, trace in enumerate(figure.get("data", [])):
        if trace.get("type", "scatter") not in bundle_trace_types():
            problems.append(f"data[{i}].type={trace.get('type')}")
        walk(trace, f"data[{i}]")
    walk(figure.get("layout", {}), "layout")
    return problems


def values(field: object) -> list:
    """A JSON array as plotly 7 writes it: a plain list, or a typed-array spec {dtype, bdata, shape}
    (base64 binary, which plotly.js reads since 2.28)."""
    if isinstance(field, dict) and "bdata" in field:
        flat = np.frombuffer(base64.b64decode(field["bdata"]), dtype=np.dtype(field["dtype"]))
        shape = [int(n) for n in str(field.get("shape", len(flat))).split(",")]
        return flat.reshape(shape).tolist()
    return field


def check_renderable(fig) -> dict:
    data = json.loads(fig.to_json())  # what gr.Plot sends to the browser
    assert unknown_attributes(data) == []
    return data


def make_trace(tokens: int = 12, layers: int = 4, experts: int = 4, k: int = 2,
               prompt: int = 8) -> RouterTrace:
    generator = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(tokens, layers, experts, generator=generator) * 2, dim=-1)
    weights, ids = route(probs, k)
    text = ["<s>", "Hello", " world", "\n", "def", " add", "(", "a", " b", ")", ":", " x"] * 100
    return RouterTrace(text[:tokens], list(range(tokens)), probs, ids, weights, torch.arange(tokens) < prompt,
                       NAMES[:experts])


def test_the_checker_catches_what_the_bundle_lacks():
    assert "3.3.1" in plotly_bundle() and {"heatmap", "bar", "scatter"} <= bundle_trace_types()
    assert "isTypedArraySpec" in plotly_bundle()  # plotly 7 writes numeric arrays as base64 specs
    newer = {"data": [{"type": "heatmapgl", "z": [[1]]}], "layout": {"legend": {"hoversort": "x"}}}
    assert unknown_attributes(newer) == ["data[0].type=heatmapgl", "layout.legend.hoversort"]


def test_routing_heatmap_colours_cells_by_top_expert_and_hovers_the_top_k():
    trace = make_trace()
    data = check_renderable(plots.routing_heatmap(trace))
    heat = data["data"][0]
    assert heat["type"] == "heatmap"
    assert values(heat["z"]) == trace.topk_ids[:, :, 0].T.tolist()  # (L, T): layer rows, token columns
    layer, token = 2, 5
    cell = heat["text"][layer][token]
    for slot in range(trace.k):
        expert = int(trace.topk_ids[token, layer, slot])
        assert f"e{expert} {NAMES[expert]} {float(trace.topk_weights[token, layer, slot]):.2f}" in cell
    assert heat["customdata"][layer][token] == plots.token_label(" add", 24)
    assert heat["colorbar"]["ticktext"] == [f"e{e} {name}" for e, name in enumerate(NAMES)]
    assert data["layout"]["shapes"][0]["x0"] == 7.5  # the line between prompt and reply
    assert isinstance(data["layout"]["template"], dict) and "layout" in data["layout"]["template"]


def test_routing_heatmap_marks_the_cells_an_intervention_changed():
    import dataclasses

    from workbench.routing import intervention_changes

    saved = make_trace()
    ids = saved.topk_ids.clone()
    ids[3, 1] = ids[3, 1].flip(-1)  # the same experts in another order: not a change of who ran
    ids[5, 2, 0], ids[5, 2, 1] = 3, 2  # other experts ran
    ids[6, 0] = torch.tensor([1, 0]) if set(ids[6, 0].tolist()) != {0, 1} else torch.tensor([2, 3])
    steered = dataclasses.replace(saved, topk_ids=ids, intervention={"ban": [0]})
    changes = intervention_changes(steered, saved)
    before = set(saved.topk_ids[5, 2].tolist()) != {2, 3}
    assert changes.count == before + 1 and bool(changes.changed[6, 0]) and not bool(changes.changed[3, 1])
    data = check_renderable(plots.routing_heatmap(steered, changes=changes))
    marks = data["data"][1]
    assert [t["type"] for t in data["data"]] == ["heatmap", "scatter"]
    assert 6 in values(marks["x"]) and "saved routers chose" in marks["hovertemplate"]
    first = values(marks["x"]).index(6)
    assert marks["text"][first] == ", ".join(f"e{e} {NAMES[e]}" for e in saved.topk_ids[6, 0].tolist())
    assert "under an intervention" in data["layout"]["title"]["text"]
    unchanged = plots.routing_heatmap(saved, changes=intervention_changes(saved, saved))
    assert [t.type for t in unchanged.data] == ["heatmap"]


def test_token_labels_are_readable_and_escaped():
    assert plots.token_label("<s>") == "&lt;s&gt;"
    assert plots.token_label("\n") == "↵" and plots.token_label(" the") == "·the"
    assert plots.token_label("x" * 40, width=10) == "x" * 9 + "…"


def test_layer_probability_heatmap_shows_one_layer():
    trace = make_trace()
    data = check_renderable(plots.layer_probs_heatmap(trace, 3))
    z = torch.tensor(values(data["data"][0]["z"]), dtype=torch.float32)
    assert torch.allclose(z, trace.probs[:, 3, :].T)
    with pytest.raises(ValueError, match="layers 0 to 3"):
        plots.layer_probs_heatmap(trace, 4)


def test_load_and_entropy_figures():
    trace = make_trace()
    load = check_renderable(plots.expert_load_figure(expert_load(trace), NAMES))
    assert len(load["data"]) == 2 * 4 and load["layout"]["barmode"] == "stack"  # prompt and reply rows
    prompt_only = check_renderable(plots.expert_load_figure(expert_load(make_trace(prompt=12)), NAMES))
    assert len(prompt_only["data"]) == 4
    entropy = check_renderable(plots.entropy_figure(routing_entropy(trace)))
    assert [t["name"] for t in entropy["data"]] == ["prompt", "reply", "all"]


def test_heldout_gate_and_divergence_figures():
    matrix = [[0.7, 0.1, 0.1, 0.1], [0.0, 1.0, 0.0, 0.0], [0.0] * 4, [0.25] * 4]
    score = HeldOutScore("fitted", False, 4, 2, 0.65, 0.9, [0.6, 0.7], [0.85, 0.95], [0.7, 1.0, None, 0.25],
                         [0.9, 1.0, None, 0.8], matrix, [12, 9, 0, 7], "2-fold over each expert's prompts")
    figure = plots.heldout_figure(score, NAMES)
    title = check_renderable(figure)["layout"]["title"]["text"]
    assert "top-1 0.65 (chance 0.25)" in title and "top-2 0.90 (chance 0.50)" in title
    z = np.array(figure.data[0].z, dtype=float)
    assert np.isnan(z[2]).all() and z[1, 1] == 1.0  # an expert with nothing held out shows no row, not zeros
    gates = torch.eye(4, 16).repeat(3, 1, 1)
    gates[1, 1] = gates[1, 0] + 0.01  # layer 1: two nearly equal experts
    sim = check_renderable(plots.gate_similarity_figure(gate_similarity(gates), NAMES))
    bars = sim["data"][1]
    assert bars["marker"]["color"][1] == "#EF553B" and bars["marker"]["color"][0] == "#636EFA"
    div = Divergence(torch.tensor([0.0, 0.5, 0.1]), torch.tensor([2, 0, 2]), ["a", "b", "c"], NAMES)
    strip = check_renderable(plots.divergence_figure(div))
    colors = plots.expert_colors(4)
    assert strip["data"][0]["marker"]["color"] == [colors[2], colors[0], colors[2]]


def test_divergence_below_a_floor_says_identical_instead_of_drawing_noise():
    """Copies of the base gave tall red bars on an axis of 1e-11 nats."""
    noise = Divergence(torch.tensor([3e-12, 8e-11, 1e-12]), torch.tensor([2, 0, 2]), ["a", "b", "c"], NAMES)
    fig = check_renderable(plots.divergence_figure(noise))
    assert fig["data"] == [] and "identical to the base" in fig["layout"]["annotations"][0]["text"]
    real = Divergence(torch.tensor([3e-12, 2e-6, 1e-12]), torch.tensor([2, 0, 2]), ["a", "b", "c"], NAMES)
    assert len(check_renderable(plots.divergence_figure(real))["data"]) == 1


def test_many_experts_get_distinct_colours():
    colors = plots.expert_colors(16)
    assert len(set(colors)) == 16 and all(re.fullmatch(r"#[0-9a-fA-F]{6}", c) for c in colors)


def test_big_heatmap_serialises():
    trace = make_trace(tokens=1024, layers=30, prompt=700)
    data = json.loads(plots.routing_heatmap(trace).to_json())
    heat = data["data"][0]
    z = values(heat["z"])
    assert len(z) == 30 and len(z[0]) == 1024 and len(heat["text"][29]) == 1024
    assert len(data["layout"]["xaxis"]["tickvals"]) <= plots.MAX_TICK_LABELS
