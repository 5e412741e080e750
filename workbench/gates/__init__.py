"""Gates: a recipe and its base model in, one (E, H) router matrix per layer out.

Takes a `Recipe` and the base model's folder; runs the base on each expert's prompts and
gives `Gates` (L, E, H tensors plus `GateDiagnostics`), or for a build `RouterGates` (the
routers' bytes, cast to the output dtype), computed beside the copy by a worker. Reads
the base; writes no file.

    types        Gates, RouterGates, GateDiagnostics: what the stage hands on
    compute      gate math for every mode (mergekit's meaning), compute_gates
    prompts      router prompts -> token batches (mergekit's BOS + text, or chat-rendered)
    forward      base forwards on prompt sets, hooks that capture router inputs
    lazy_weights a base streamed from disk leaf by leaf
    llama        a plain Llama/Mistral forward in torch alone, for a gates process without transformers
    plain_tokenizer  tokenizer.json read directly where transformers would use it as it is
    rows         torch-free gates: noise modes, the dtype cast, diagnostics
    bank, fit    every prompt's states from one pass; the fitted router (gate_mode fitted)
    score        held-out routing score, scored_gates (gates + score), the gate-mode comparison
    advice       what a score means, in words (no torch)
    thread, process, workers   the gate worker a build waits on: given, thread or child
"""

from workbench.faces import face

EXPORTS = {
    "CONDITION_WARN": "types", "GateDiagnostics": "types", "Gates": "types", "HeldOutScore": "types",
    "RouterGates": "types",
    "explain": "advice", "COMPARED": "score", "compare_modes": "score", "mode_label": "score",
    "score_recipe": "score",
    "scored_gates": "score",
    "compute_gates": "compute", "diagnose": "compute",
    "router_inputs": "forward",
    "from_gates": "rows", "noise_gates": "rows",
    "GateRequest": "process", "GateWorker": "thread", "start_gates": "workers",
}
__getattr__, __dir__ = face(__name__, EXPORTS)
