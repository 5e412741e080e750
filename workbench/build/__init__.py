"""Build: a recipe and its resolved models in, a verified MoE folder out (or nothing).

Takes a `Recipe`, the `ModelSource`s of its models and the gates (or a worker computing
them); streams every tensor from the sources into sharded safetensors in the output
layout, with config, tokenizer, recipe copy, model card and manifest, in a staging folder
that is verified and renamed into place. Also pushes a finished build to the Hub.

    builder   plan, write, verify, commit: build()
    layout    output tensor names, shapes, shards and config per family
    writer    the streaming safetensors writer
    card      the model card (README.md)
    upload    push(): upload a build's manifest files in one checked commit
    families  which layout and config each output family uses
    shared_experts  the Qwen2-MoE and DeepSeek-MoE layouts and configs
    gguf      export_gguf(): a build as GGUF through llama.cpp's packaged converter, checked
"""

from workbench.faces import face

EXPORTS = {
    "BuildResult": "builder", "build": "builder", "output_dtype": "builder", "output_path": "builder",
    "parse_size": "builder",
    "Dims": "layout", "ties_embeddings": "layout",
    "model_card": "upload", "push": "upload",
    "GGUF_INSTALL": "gguf", "GGUF_TYPES": "gguf", "QUANTIZE_HELP": "gguf", "converter_available": "gguf",
    "export_gguf": "gguf", "export_job": "gguf", "gguf_name": "gguf",
}
__getattr__, __dir__ = face(__name__, EXPORTS)
