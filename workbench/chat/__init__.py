"""Chat: model references in, streamed replies (and their router traces) out.

Takes a base and a built MoE by reference; loads each once into a bounded registry (the
MoE shares the base's tensors), applies the chat template, checks every request before it
runs, and streams replies token by token, optionally recording a `RouterTrace`. Knows
nothing of Gradio.

    engine    the model registry: load once, share tensors, one forward at a time
    share     tensor sharing between a MoE and its base
    request   sampling settings, the chat template, request checks
    generate  prefill, decode steps, sampling, the streaming loop
"""

from workbench.faces import face

EXPORTS = {
    "registry": "engine", "load_model": "engine", "saved_recipe": "engine",
    "SamplingSettings": "request", "prepare": "request",
    "ReplyStream": "generate", "chat_streams": "generate", "reply_logits": "generate",
}
__getattr__, __dir__ = face(__name__, EXPORTS)
