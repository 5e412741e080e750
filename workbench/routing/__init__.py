"""Routing: a model and text (or a reply) in, router decisions and what they mean out.

Takes a loaded MoE (or the base with a recipe's gates, for the preview without a build);
gives a `RouterTrace` (per token and layer: probabilities over experts, top-k ids and
weights), numbers read from traces (load, entropy, divergence from the
base) and plotly figures of them. Hooks always come off.

    trace     router hooks, RouterTrace, tracing a text
    preview   a recipe's gates applied to the base's own states, no build
    analysis  load, entropy, divergence: pure functions of traces
    plots     plotly figures of traces and analysis
"""

from workbench.faces import face

EXPORTS = {
    "RouterRecorder": "trace", "RouterTrace": "trace", "find_routers": "trace", "router_hooks": "trace",
    "trace_text": "trace",
    "preview_routing": "preview",
    "divergence": "analysis", "expert_load": "analysis",
    "routing_entropy": "analysis", "routing_summary": "analysis",
    "heldout_figure": "plots", "divergence_figure": "plots", "entropy_figure": "plots",
    "expert_load_figure": "plots", "gate_similarity_figure": "plots", "layer_probs_heatmap": "plots",
    "routing_heatmap": "plots", "IDENTICAL_NATS": "plots",
}
__getattr__, __dir__ = face(__name__, EXPORTS)
