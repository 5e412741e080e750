"""Routing: a model and text (or a reply) in, router decisions and what they mean out.

Takes a loaded MoE (or the base with a recipe's gates, for the preview without a build);
gives a `RouterTrace` (per token and layer: probabilities over experts, top-k ids and
weights), numbers read from traces (load, entropy, divergence from the
base) and plotly figures of them; applies one request's interventions (force, ban,
ablate, top-k, temperature, a recipe's routers swapped in) to a loaded MoE without changing
it. Hooks and overrides always come off.

    trace     router hooks, RouterTrace
    tracing   a text (or prompt and reply) routed through a built MoE in one forward
    steer     interventions as values (force, ban, ablate, top-k, temperature, swapped routers)
    intervene an intervention applied to a loaded MoE for one forward; always undone
    swap      a recipe's gates as the routers a build would write, for a loaded MoE
    preview   a recipe's gates applied to the base's own states, no build
    analysis  load, entropy, divergence: pure functions of traces
    plots     plotly figures of traces and analysis
"""

from workbench.faces import face

EXPORTS = {
    "RouterRecorder": "trace", "RouterTrace": "trace", "find_routers": "trace", "router_hooks": "trace",
    "router_weights": "trace",
    "trace_ids": "tracing", "trace_text": "tracing",
    "Force": "steer", "Intervention": "steer", "InterventionError": "steer", "NO_INTERVENTION": "steer",
    "parse_force": "steer", "parse_layers": "steer",
    "Steering": "intervene", "is_steered": "intervene", "steered": "intervene", "steering_for": "intervene",
    "recipe_routers": "swap", "swap_notes": "swap",
    "preview_routing": "preview",
    "divergence": "analysis", "expert_load": "analysis", "intervention_changes": "analysis",
    "routing_entropy": "analysis", "routing_summary": "analysis",
    "heldout_figure": "plots", "divergence_figure": "plots", "entropy_figure": "plots",
    "expert_load_figure": "plots", "gate_similarity_figure": "plots", "layer_probs_heatmap": "plots",
    "routing_heatmap": "plots", "IDENTICAL_NATS": "plots",
}
__getattr__, __dir__ = face(__name__, EXPORTS)
