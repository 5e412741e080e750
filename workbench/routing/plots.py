"""Plotly figures of router traces and their analysis; no routing is computed here.

Figures use only heatmap, bar and scatter traces and long-standing properties, because the
browser renders them with the plotly.js that Gradio bundles (3.3.1 in gradio 6.31), older
than the one plotly 7 for Python targets; tests check every property against that bundle.
Big arrays go in as numpy arrays (plotly validates those without a Python loop), so the
token-by-layer heatmap of 1,024 tokens x 30 layers builds in well under 0.2 s.

Legend: T tokens, L layers, E experts, k experts per token.
"""

from __future__ import annotations

import colorsys
import html

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from workbench.gates import CONDITION_WARN, GateDiagnostics, HeldOutScore
from workbench.routing.analysis import Divergence, Entropy, ExpertLoad, InterventionChanges
from workbench.routing.trace import RouterTrace

# Plotly's qualitative palette, then evenly spread hues for recipes with more experts.
PALETTE = ["#636EFA", "#EF553B", "#00CC96", "#AB63FA", "#FFA15A", "#19D3F3", "#FF6692", "#B6E880",
           "#FF97FF", "#FECB52"]
MAX_TICK_LABELS = 80
TEMPLATE = "plotly_white"


def expert_colors(n: int) -> list[str]:
    if n <= len(PALETTE):
        return PALETTE[:n]
    out = []
    for i in range(n):
        r, g, b = colorsys.hls_to_rgb(i / n, 0.55, 0.65)
        out.append(f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}")
    return out


def token_label(text: str, width: int = 14) -> str:
    """A token as it can be read in a tick or a hover: whitespace made visible, HTML escaped."""
    shown = text.replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍")
    if shown.strip() != shown or not shown:
        shown = shown.replace(" ", "·") or "∅"
    if len(shown) > width:
        shown = shown[: width - 1] + "…"
    return html.escape(shown)


def expert_label(e: int, names: list[str], width: int = 40) -> str:
    name = names[e] if e < len(names) else ""
    short = name if len(name) <= width else "…" + name[-(width - 1):]
    return html.escape(f"e{e} {short}".strip())


def _token_axis(fig: go.Figure, tokens: list[str], most: int = MAX_TICK_LABELS, **where: int) -> None:
    """Token strings as x tick labels, thinned so that at most `most` show."""
    step = max(1, -(-len(tokens) // most))
    ticks = list(range(0, len(tokens), step))
    fig.update_xaxes(tickmode="array", tickvals=ticks, ticktext=[token_label(tokens[i]) for i in ticks],
                     tickangle=-60, **where)


def _discrete_scale(colors: list[str]) -> list[list]:
    n = len(colors)
    scale = []
    for i, c in enumerate(colors):
        scale += [[i / n, c], [(i + 1) / n, c]]
    return scale


def _prompt_boundary(fig: go.Figure, trace: RouterTrace) -> None:
    prompt = int(trace.is_prefill.sum())
    if 0 < prompt < trace.num_tokens:
        fig.add_vline(x=prompt - 0.5, line_width=2, line_dash="dash", line_color="#333")


def routing_heatmap(trace: RouterTrace, *, title: str | None = None,
                    changes: InterventionChanges | None = None) -> go.Figure:
    """Tokens (x) by layers (y), each cell coloured by its top expert; hover lists the top-k.

    With `changes` (the trace was routed under an intervention), each cell whose experts
    differ from the saved routers' carries a mark, and its hover names the saved choice."""
    top = trace.topk_ids.numpy()  # (T, L, k)
    percent = np.rint(trace.topk_weights.numpy() * 100).astype(np.int64)  # (T, L, k)
    labels = [expert_label(e, trace.expert_names) for e in range(trace.experts)]
    # Fixed-width unicode arrays, not Python strings: plotly copies them as one block, and
    # the hover lines are looked up and joined by numpy rather than formatted cell by cell.
    names, numbers = np.array(labels), np.array([f"{i / 100:.2f}" for i in range(101)])
    text = None
    for slot in range(trace.k):
        line = np.strings.add(np.strings.add(names[top[:, :, slot].T], " "), numbers[percent[:, :, slot].T])
        text = line if text is None else np.strings.add(np.strings.add(text, "<br>"), line)  # (L, T)
    tokens = np.array([token_label(t, 24) for t in trace.tokens])
    custom = np.broadcast_to(tokens, (trace.layers, trace.num_tokens))
    colors = expert_colors(trace.experts)
    heatmap = {
        "type": "heatmap", "z": top[:, :, 0].T, "zmin": -0.5, "zmax": trace.experts - 0.5,
        "colorscale": _discrete_scale(colors), "text": text, "customdata": custom,
        "hovertemplate": "token %{x}: %{customdata}<br>layer %{y}<br>%{text}<extra></extra>",
        "colorbar": {"title": {"text": "top expert"}, "tickmode": "array",
                     "tickvals": list(range(trace.experts)), "ticktext": labels},
    }
    # Unvalidated: plotly's validators turn the 30k-cell string tables into Python objects and
    # deep-copy them (~0.2 s for 1,024 tokens); this dict is fixed and tested against plotly.js.
    # A template name is resolved only by validation, so the template goes in as its JSON.
    fig = go.Figure({"data": [heatmap], "layout": {"template": pio.templates[TEMPLATE].to_plotly_json()}},
                    _validate=False)
    if changes is not None and changes.count:
        fig.add_trace(_changed_marks(trace, changes, names))
    _token_axis(fig, trace.tokens)
    _prompt_boundary(fig, trace)
    kind = "preview (no build)" if trace.source == "preview" else "built model"
    if trace.intervention is not None:
        kind += ", under an intervention"
    fig.update_layout(title={"text": title or f"Top expert per token and layer: {kind}"},
                      yaxis={"title": {"text": "layer"}, "autorange": "reversed"},
                      xaxis={"title": {"text": "token"}}, margin={"b": 120})
    return fig


def _changed_marks(trace: RouterTrace, changes: InterventionChanges, names: np.ndarray) -> go.Scatter:
    """An x over every (token, layer) cell the intervention changed; hover: the saved choice."""
    t, layer = np.nonzero(changes.changed.numpy())  # (N,) each
    saved = changes.saved_ids.numpy()[t, layer]  # (N, k)
    text = names[saved[:, 0]]
    for slot in range(1, saved.shape[1]):
        text = np.strings.add(np.strings.add(text, ", "), names[saved[:, slot]])
    return go.Scatter(x=t, y=layer, mode="markers", name="changed by the intervention", showlegend=False,
                      marker={"symbol": "x", "size": 7, "color": "rgba(20, 20, 20, 0.75)"},
                      text=text, hovertemplate="token %{x}, layer %{y}: changed by the intervention<br>"
                                                "saved routers chose %{text}<extra></extra>")


def layer_probs_heatmap(trace: RouterTrace, layer: int) -> go.Figure:
    """Tokens (x) by experts (y) for one layer: the router's probability of each expert."""
    if not 0 <= layer < trace.layers:
        raise ValueError(f"layer {layer} does not exist; this trace has layers 0 to {trace.layers - 1}")
    labels = [expert_label(e, trace.expert_names) for e in range(trace.experts)]
    tokens = np.array([token_label(t, 24) for t in trace.tokens])
    fig = go.Figure(go.Heatmap(
        z=trace.probs[:, layer, :].numpy().T, zmin=0, zmax=1, colorscale="Viridis", y=labels,
        customdata=np.broadcast_to(tokens, (trace.experts, trace.num_tokens)),
        hovertemplate="token %{x}: %{customdata}<br>%{y}<br>p = %{z:.3f}<extra></extra>",
        colorbar={"title": {"text": "probability"}},
    ))
    _token_axis(fig, trace.tokens, most=MAX_TICK_LABELS // 3)  # a half-width panel: fewer labels
    _prompt_boundary(fig, trace)
    fig.update_layout(template=TEMPLATE, title={"text": f"Router probabilities at layer {layer}"},
                      margin={"b": 120})
    return fig


def expert_load_figure(load: ExpertLoad, names: list[str]) -> go.Figure:
    """Stacked bars per layer: each expert's share of top-k choices, prompt and reply apart."""
    phases = [("prompt", load.prefill, load.prefill_tokens), ("reply", load.decode, load.decode_tokens)]
    phases = [p for p in phases if p[2]] or [("all", load.overall, 0)]
    fig = make_subplots(rows=len(phases), cols=1, shared_xaxes=True,
                        subplot_titles=[f"{name} ({n} tokens)" for name, _, n in phases])
    colors = expert_colors(load.overall.shape[1])
    layers = list(range(load.overall.shape[0]))
    for row, (_, share, _) in enumerate(phases, start=1):
        for e, color in enumerate(colors):
            fig.add_trace(go.Bar(x=layers, y=share[:, e].numpy(), name=expert_label(e, names),
                                 marker={"color": color}, legendgroup=f"e{e}", showlegend=row == 1,
                                 hovertemplate=f"{expert_label(e, names)}<br>layer %{{x}}: %{{y:.1%}}"
                                               "<extra></extra>"), row=row, col=1)
    fig.update_layout(template=TEMPLATE, barmode="stack", title={"text": "Expert load per layer"})
    fig.update_yaxes(range=[0, 1], tickformat=".0%")
    fig.update_xaxes(title={"text": "layer"}, row=len(phases), col=1)
    return fig


def entropy_figure(entropy: Entropy) -> go.Figure:
    """Normalised routing entropy per layer: 0 = decided, 1 = uniform."""
    fig = go.Figure()
    for name, values in (("prompt", entropy.prefill), ("reply", entropy.decode), ("all", entropy.overall)):
        if not bool(values.isnan().all()):
            fig.add_trace(go.Scatter(x=list(range(len(values))), y=values.numpy(), mode="lines+markers",
                                     name=name, hovertemplate="layer %{x}: %{y:.3f}<extra></extra>"))
    fig.update_layout(template=TEMPLATE, title={"text": "Routing entropy per layer (1 = uniform)"},
                      xaxis={"title": {"text": "layer"}}, yaxis={"range": [0, 1.05]})
    return fig


def heldout_figure(score: HeldOutScore, names: list[str]) -> go.Figure:
    """Where each expert's held-out tokens went first (rows sum to one), and the top-1 / top-k
    hit rate per layer against chance."""
    labels = [expert_label(e, names, 24) for e in range(len(names))]
    fig = make_subplots(rows=1, cols=2, column_widths=[0.5, 0.5], horizontal_spacing=0.22,
                        subplot_titles=["held-out tokens of (rows) routed first to (columns)",
                                        "hit rate per layer"])
    z = np.array([row if n else [np.nan] * len(row)
                  for row, n in zip(score.matrix, score.tokens, strict=True)])
    fig.add_trace(go.Heatmap(z=z, x=labels, y=labels, zmin=0, zmax=1, colorscale="Blues",
                             texttemplate="%{z:.2f}", showscale=False,
                             hovertemplate="held-out prompts of %{y}<br>routed first to %{x}: %{z:.1%}"
                             "<extra></extra>"), row=1, col=1)
    layers = list(range(len(score.top1_per_layer)))
    for values, name, chance in ((score.top1_per_layer, "top-1", score.chance_top1),
                                 (score.topk_per_layer, f"top-{score.k}", score.chance_topk)):
        hover = f"layer %{{x}}: {name} %{{y:.3f}} (chance {chance:.2f})<extra></extra>"
        fig.add_trace(go.Scatter(x=layers, y=values, mode="lines+markers", name=name, hovertemplate=hover),
                      row=1, col=2)
    fig.add_hline(y=score.chance_top1, line_dash="dot", line_color="#888", row=1, col=2,
                  annotation_text="top-1 chance", annotation_position="bottom right")
    fig.update_yaxes(autorange="reversed", row=1, col=1)
    fig.update_yaxes(range=[0, 1.05], row=1, col=2)
    fig.update_xaxes(title={"text": "layer"}, row=1, col=2)
    fig.update_annotations(font_size=12, yshift=8)
    title = "Held-out routing: nothing to hold out" if score.top1 is None else (
        f"Held-out routing: {score.rates(2)}; perfect 1")
    fig.update_layout(template=TEMPLATE, title={"text": title}, margin={"t": 90},
                      legend={"orientation": "h", "y": -0.2})
    return fig


def gate_similarity_figure(diag: GateDiagnostics, names: list[str]) -> go.Figure:
    """Mean expert-expert cosine of the gates, and each layer's condition number."""
    labels = [expert_label(e, names, 24) for e in range(len(names))]
    conds = np.array([c if np.isfinite(c) else np.nan for c in diag.condition_numbers])
    # Room between and above the two panels: their titles overlapped each other and the figure's.
    fig = make_subplots(rows=1, cols=2, column_widths=[0.45, 0.55], horizontal_spacing=0.2,
                        subplot_titles=["gate cosine (mean over layers)", "condition number per layer"])
    fig.add_trace(go.Heatmap(z=np.array(diag.mean_cosine), x=labels, y=labels, zmin=-1, zmax=1,
                             colorscale="RdBu", reversescale=True, texttemplate="%{z:.2f}", showscale=False,
                             hovertemplate="%{y} vs %{x}: %{z:.3f}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Bar(x=list(range(len(conds))), y=conds, name="condition number",
                         marker={"color": np.where(conds > CONDITION_WARN, "#EF553B", "#636EFA")},
                         hovertemplate="layer %{x}: %{y:.2f}<extra></extra>", showlegend=False), row=1, col=2)
    fig.add_hline(y=CONDITION_WARN, line_dash="dash", line_color="#EF553B", row=1, col=2)
    fig.update_yaxes(autorange="reversed", row=1, col=1)
    fig.update_xaxes(title={"text": "layer"}, row=1, col=2)
    fig.update_annotations(font_size=12, yshift=8)
    fig.update_layout(template=TEMPLATE, title={"text": f"Gate similarity (condition > {CONDITION_WARN:g}: "
                                                        "prompts too similar)", "y": 0.97},
                      margin={"t": 110, "b": 110})
    return fig


IDENTICAL_NATS = 1e-6  # KL below this is float rounding, not a difference a reader should see


def divergence_figure(div: Divergence) -> go.Figure:
    """KL(MoE || base) per reply token, each bar coloured by the expert that produced it.

    Below IDENTICAL_NATS everywhere the bars are rounding noise (copies of the base give
    1e-11): the figure then says the two models are identical instead of drawing them."""
    largest = float(div.kl.max()) if len(div.kl) else 0.0
    if largest < IDENTICAL_NATS:
        fig = go.Figure()
        fig.add_annotation(text=f"identical to the base: the largest KL is {largest:.1e} nats, "
                                f"below {IDENTICAL_NATS:.0e}", showarrow=False, x=0.5, y=0.5,
                           xref="paper", yref="paper", font={"size": 15})
        fig.update_layout(template=TEMPLATE, title={"text": "Base vs MoE: KL of next-token distributions"},
                          xaxis={"visible": False}, yaxis={"visible": False}, height=220)
        return fig
    colors = expert_colors(len(div.expert_names))
    experts = div.top_expert.tolist()
    tokens = [token_label(t, 24) for t in div.tokens]
    fig = go.Figure(go.Bar(
        x=list(range(len(tokens))), y=div.kl.numpy(), marker={"color": [colors[e] for e in experts]},
        customdata=np.array([[tok, expert_label(e, div.expert_names)] for tok, e in zip(tokens, experts,
                                                                                         strict=True)],
                            dtype=object).reshape(len(tokens), 2),
        hovertemplate="%{customdata[0]}<br>KL %{y:.4f} nats<br>top expert %{customdata[1]}<extra></extra>",
    ))
    _token_axis(fig, div.tokens)
    fig.update_layout(template=TEMPLATE, title={"text": "Base vs MoE: KL of next-token distributions"},
                      yaxis={"title": {"text": "KL (nats)"}}, margin={"b": 120})
    return fig
