"""Models: a model reference in, a local folder of config.json, safetensors and tokenizer out.

Takes a reference (a local folder, a Hub id, or `demo:NAME` for the bundled demo model,
optionally `+LORA`) and gives a `ModelSource` (folder, revision, config, LoRA adapter);
reads safetensors headers and byte ranges without loading a model (`WeightIndex`); makes
folders portable between transformers 4 and 5. Never loads a whole model, never unpickles.

    sources   references -> folders; config.json for validation
    hub       Hub listing and downloads; tokens (from the user or HF_TOKEN, never logged)
    demo      the bundled SmolLM2 GGUF, dequantised once into a safetensors cache
    lora      peft LoRA adapters of `model+lora` references, applied as weights are read
    tensors   safetensors tables, checked headers, a lazy index over a folder
    portable  config and tokenizer fix-ups for transformers 4 and 5
    template  a tokenizer's chat template: messages -> the text the model reads
"""

from workbench.faces import face

EXPORTS = {
    "ModelSource": "sources", "demo_model_path": "sources", "parse_ref": "sources", "read_configs": "sources",
    "resolve": "sources",
    "child_environment": "hub", "env_token": "hub", "network_errors": "hub", "scrub": "hub",
    "DEMO_MODELS": "demo", "DemoModel": "demo",
    "DTYPE_NAMES": "tensors", "TensorFileError": "tensors", "TensorInfo": "tensors",
    "WeightIndex": "tensors", "dtype_code": "tensors", "tensor_nbytes": "tensors", "torch_dtype": "tensors",
    "make_tokenizer_portable": "portable", "portable_config": "portable",
    "FALLBACK_TEMPLATE": "template", "TemplateFailure": "template", "render_chat": "template",
    "user_turn": "template",
}
__getattr__, __dir__ = face(__name__, EXPORTS)
