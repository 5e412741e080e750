"""Forge: a base model and a few examples in, an expert whose MLPs learned them out.

Takes a base model reference and a JSON-lines file of examples (`{"prompt", "reply"}` chat
pairs or `{"text"}`); trains only the MLP weights (`workbench.forge.train`) and writes a
whole model folder as a build writes one (`workbench.forge.expert`), usable as any
expert's `source_model`. Writes only its output folder.

    data     examples read and checked, each error naming its line
    settings ForgeSettings: steps, learning rate, batch size, seed, layers (no torch)
    train    the MLP-only training loop: settings, encoding, seeded AdamW
    expert   forge_expert: load, train, write (staged, manifested, renamed), the card
    samples  greedy replies of the base and the forged expert, side by side
    job      forge_job: a forge as a queued job (workbench.jobs), JSON-ready result
    sets     the shipped example sets (assets/forge), an expert's forge_data as a file
"""

from workbench.faces import face

EXPORTS = {
    "Example": "data", "Examples": "data", "read_examples": "data", "parse_examples": "data",
    "MAX_DATA_BYTES": "data", "examples_text": "data",
    "ForgeSettings": "settings", "mlp_parameters": "train",
    "ForgeResult": "expert", "forge_expert": "expert", "sample_replies": "samples", "forge_job": "job",
    "example_sets": "sets", "data_path": "sets",
}
__getattr__, __dir__ = face(__name__, EXPORTS)
