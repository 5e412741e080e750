"""The model card (README.md) written next to a built MoE.

YAML front matter the Hub reads (license, base_model list, tags), then what a visitor
needs: the experts and their prompts, where the weights really come from, the recipe that
rebuilds the model (and whether mergekit-moe builds the same from it), and the gate
diagnostics that tell whether the router can tell the experts apart. Holds no tokens; the
tables name a local folder by its own name only, and `base_model` lists Hub ids only.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import yaml

from workbench.gates import GateDiagnostics, HeldOutScore
from workbench.models import DEMO_MODELS, DemoModel
from workbench.recipe import (
    FAMILY_LABELS,
    PROMPTLESS_MODES,
    Recipe,
    dump_recipe,
    load_yaml,
    mergekit_reading,
    split_ref,
)

log = logging.getLogger(__name__)

TAGS = ["moe", "frankenmoe", "merge", "mergekit", "moe-workbench"]
FAMILY_TAGS = {"mixtral": "mixtral", "qwen": "qwen2_moe", "deepseek": "deepseek"}
# What reads each family's layout, in the card's words.
READERS = {
    "mixtral": "in the classic Mixtral layout that transformers 4.x/5.x, vLLM and llama.cpp read",
    "qwen": "as a Qwen2-MoE (`Qwen2MoeForCausalLM`) with one shared expert behind a sigmoid gate, "
            "which transformers 4.x/5.x, vLLM and llama.cpp's converter read (llama.cpp, unlike transformers "
            "and vLLM, does not renormalise the top-k router weights of this family)",
    "deepseek": "as a DeepSeek-MoE (`DeepseekForCausalLM`, v1): transformers loads it only with "
                "`trust_remote_code=True` (deepseek-ai's modeling file); vLLM and llama.cpp's converter "
                "read it natively",
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_id(ref: str) -> str | None:
    """The Hub model id behind a reference (revision and LoRA dropped), or None for a local
    folder; a demo model's is the model it was quantised from.

    Only these go into `base_model`: the Hub refuses a card whose base_model is not a model id.
    """
    ref = split_ref(ref)[0]
    if ref.startswith("demo:"):
        demo = _demo_model(ref)
        return demo.upstream if demo else None
    bare = ref.split("@", 1)[0]
    return bare if HUB_ID.match(bare) and not Path(bare).exists() else None


def hub_ids(refs: list[str]) -> list[str]:
    """Every Hub id the references name, LoRA adapters included, each once."""
    parts = [part for ref in refs for part in split_ref(ref) if part]
    return list(dict.fromkeys(i for i in map(hub_id, parts) if i))


def display_name(ref: str) -> str:
    """How the card names a model: its hub id, a demo model by its own name (its weights are
    not the upstream's; `_provenance` says what they are), else a folder's own name (never a
    full local path, which would leak the builder's file system); a LoRA after a '+'."""
    model, lora = split_ref(ref)
    if lora is not None:
        return f"{display_name(model)} + LoRA {display_name(lora)}"
    if ref.startswith("demo:"):
        return ref
    return hub_id(ref) or Path(ref).name or ref


def base_license(sources: dict[str, Any], base_ref: str) -> str:
    """The base model card's license, when it has a README with front matter; else 'other'."""
    source = sources.get(base_ref)
    readme = Path(source.path) / "README.md" if source is not None else None
    if readme is not None and readme.is_file():
        value = _front_matter(readme.read_text(encoding="utf-8", errors="replace")).get("license")
        if isinstance(value, str) and value:
            return value
    demo = _demo_model(base_ref)
    return demo.license if demo else "other"


def _demo_model(ref: str) -> DemoModel | None:
    """The bundled demo model a `demo:NAME` reference names (its folder has no model card)."""
    return DEMO_MODELS.get(ref.removeprefix("demo:")) if ref.startswith("demo:") else None


def _front_matter(text: str) -> dict:
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        meta = load_yaml(text[3:end])
    except yaml.YAMLError:
        log.info("base model card has unreadable front matter; license left as 'other'")
        return {}
    return meta if isinstance(meta, dict) else {}


def render_card(recipe: Recipe, diagnostics: GateDiagnostics, sources: dict[str, Any], config: dict,
                seed: int = 0, score: HeldOutScore | None = None) -> str:
    """README.md text: front matter, description, experts, recipe, routing report, gate
    diagnostics; `seed` is the build's, named in the rebuild command where the recipe draws
    random numbers; `score` the gates' held-out score (no report without one)."""
    ids = hub_ids(recipe.model_refs())
    meta: dict[str, Any] = {"license": base_license(sources, recipe.base_model)}
    if ids:
        meta["base_model"] = list(dict.fromkeys(ids))
    meta.update(tags=[*TAGS, FAMILY_TAGS[recipe.family]], library_name="transformers",
                pipeline_tag="text-generation")
    base_name = display_name(recipe.base_model)
    experts = len(recipe.experts)
    k = recipe.experts_per_token
    parts = [
        "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n",
        f"# {experts}-expert {FAMILY_LABELS[recipe.family]} MoE on {base_name}\n",
        f"A frankenMoE built with MoE Workbench: attention, embeddings and norms from "
        f"`{base_name}`, the MLP of each expert from the models below, and routers derived "
        f"from each expert's prompts (gate mode `{recipe.gate_mode}`, no training). "
        f"Each token uses {k} of {experts} experts"
        + (" and the shared expert" if recipe.shared_experts else "")
        + f". Weights are `{config.get('dtype')}`, {READERS[recipe.family]}.\n",
        _experts_table(recipe, sources) + _provenance(recipe, sources),
        _rebuild(recipe, seed) + "\n\n```yaml\n" + dump_recipe(recipe).rstrip() + "\n```\n",
        *([_routing_report(score, recipe.expert_labels())] if score is not None else []),
        _diagnostics(diagnostics),
    ]
    return "\n".join(parts)


def _provenance(recipe: Recipe, sources: dict[str, Any]) -> str:
    """What a demo model's weights are: dequantised GGUF values (or, where its package was
    missing, its upstream repo at the commit the build read)."""
    lines = []
    for ref in dict.fromkeys(split_ref(r)[0] for r in recipe.model_refs()):
        demo = _demo_model(ref)
        if demo is None:
            continue
        revision = getattr(sources.get(ref), "revision", None)
        if revision:
            what = (f"read from {demo.upstream} at commit {revision[:12]} (its package "
                    f"`{demo.pip_name}` was not installed)")
        else:
            what = demo.provenance()
        lines.append(f"- `{ref}`: {what}.")
    return "\n" + "\n".join(lines) + "\n" if lines else ""


def _rebuild(recipe: Recipe, seed: int) -> str:
    """The recipe section's first line: the command that builds this model again, and
    whether mergekit-moe 0.1.5 builds the same model from the same file."""
    command = "python -m workbench build mergekit_moe_config.yml OUT"
    seeded = recipe.gate_mode in PROMPTLESS_MODES or any(e.noise_scale for e in recipe.experts)
    if not seeded:
        return f"## Recipe\n\nRebuild with `{command}`. {_mergekit_sentence(recipe, seeded)}"
    return (f"## Recipe\n\nRebuild with `{command} --seed {seed}`: the seed makes the random "
            f"routers and the experts' noise the same again. {_mergekit_sentence(recipe, seeded)}")


def _mergekit_sentence(recipe: Recipe, seeded: bool) -> str:
    reading = mergekit_reading(recipe)
    if reading.stops:
        return "mergekit-moe 0.1.5 cannot build this file: " + "; ".join(reading.stops) + "."
    if reading.ignored:
        keys = ", ".join(f"`{k}`" for k in reading.ignored)
        return (f"mergekit-moe 0.1.5 reads this file but ignores {keys}, so it builds different routers "
                "from it.")
    sentence = "mergekit-moe 0.1.5 reads the same file"
    if reading.flag:
        sentence += f" with its `{reading.flag}` flag (every expert is the same model)"
    if reading.labels:
        sentence += f", ignoring {' and '.join(f'`{k}`' for k in reading.labels)} (they only label and score)"
    return sentence + (", with random numbers of its own." if seeded else ".")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _prompts(prompts: list[str] | None) -> str:
    if not prompts:
        return "-"
    shown = ", ".join(f'"{_cell(_short(p))}"' for p in prompts[:3])
    return shown + (f" (+{len(prompts) - 3})" if len(prompts) > 3 else "")


def _short(text: str, limit: int = 40) -> str:
    """At most `limit` characters, cut at a word and marked, never mid-word without a sign."""
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0] if " " in text[:limit] else text[:limit]
    return cut.rstrip(" ,.;:") + "…"


def _experts_table(recipe: Recipe, sources: dict[str, Any]) -> str:
    rows = ["## Experts\n", "| # | name | model | positive prompts | negative prompts |",
            "|---|---|---|---|---|"]
    for i, (expert, label) in enumerate(zip(recipe.experts, recipe.expert_labels(), strict=True)):
        model = display_name(expert.source_model)
        if expert.forge_data:  # trained here: the card says from what, as mergekit would not know
            model += f" (forged from {expert.forge_data!r} on the base)"
        rows.append(f"| {i} | {_cell(label)} | {_cell(model)} | {_prompts(expert.positive_prompts)} | "
                    f"{_prompts(expert.negative_prompts)} |")
    return "\n".join(rows) + "\n"


def _routing_report(score: HeldOutScore, names: list[str]) -> str:
    """Held-out top-1 / top-k next to chance and perfect, and where each theme's tokens went."""
    mode = f"`{score.mode}`" + (" centred" if score.center else "")
    if score.top1 is None:
        return (f"## Routing report\n\nGate mode {mode}. No prompt could be held out to score the "
                "routers (every expert has a single positive prompt and no probe prompts).\n")
    lines = ["## Routing report\n",
             f"How often the router sends a theme's held-out tokens to that theme's expert (gate mode "
             f"{mode}; held out: {score.held_out}; routed on the base model's states, exact where the "
             "experts copy the base).\n",
             "| measure | score | chance | perfect |", "|---|---|---|---|",
             f"| top-1 hit rate | {score.top1:.3f} | {score.chance_top1:.3f} | 1 |",
             f"| top-{score.k} hit rate | {score.topk:.3f} | {score.chance_topk:.3f} | 1 |",
             "\nShare of each expert's held-out tokens by the router's first choice (mean over layers):\n",
             "| prompts of \\ routed to | " + " | ".join(_cell(n) for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for name, row, tokens in zip(names, score.matrix, score.tokens, strict=True):
        cells = [f"{v:.2f}" for v in row] if tokens else ["-"] * len(row)
        lines.append(f"| {_cell(name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _diagnostics(diag: GateDiagnostics) -> str:
    """Per-layer condition number and mean off-diagonal expert cosine of the router rows."""
    lines = ["## Gate diagnostics\n",
             "A condition number above 5 or a cosine near 1 means the router can hardly tell "
             "those experts apart (their prompts are too similar).\n",
             "| layer | condition number | mean expert cosine |", "|---|---|---|"]
    for layer, cond in enumerate(diag.condition_numbers):
        shown = f"{cond:.2f}" if math.isfinite(cond) else "inf"
        lines.append(f"| {layer} | {shown} | {diag.off_diagonal_cosine(layer):.3f} |")
    if diag.warnings:
        lines.append("\nWarnings:\n")
        lines += [f"- {_cell(w)}" for w in diag.warnings]
    return "\n".join(lines) + "\n"
