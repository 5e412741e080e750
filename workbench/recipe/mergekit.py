"""What mergekit-moe 0.1.5 does with a recipe the workbench accepts: whether it builds the
same model from the same file, needs a flag for it, ignores a key, or stops.

Read from mergekit 0.1.5's source and checked by running it on pico models:
- `mergekit/moe/config.py` `is_bad_config`: outside `gate_mode: random` every expert needs
  positive prompts, the (positive, negative) prompt sets must differ somewhere (one expert
  alone counts as all the same), and experts that are all the same model need
  `--i-understand-this-is-not-useful-without-training`;
- `mergekit/moe/router.py` `get_gate_params`: a mode it does not know leaves its worker None,
  so `router_input`, `fitted` or a typo crash with "TypeError: 'NoneType' object is not
  callable";
- `mergekit/common.py` `ModelReference`: `model+lora` parses, but mergekit-moe opens every
  model with `lazy_loader()` and never calls `merged()`, so it stops with "AssertionError:
  LoRA not merged";
- pydantic models with the default `extra="ignore"`: keys it does not know (`center_gates`,
  `prompt_template`, `name`, `probe_prompts`, `forge_data`) are dropped without a word; it
  always tokenises prompts as plain text.
Pure: no I/O, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from workbench.recipe.refs import DEMO_PREFIX, split_ref
from workbench.recipe.schema import Recipe

MERGEKIT = "mergekit-moe 0.1.5"
ALL_SAME_FLAG = "--i-understand-this-is-not-useful-without-training"
# Gate modes only the workbench computes; mergekit-moe crashes on them.
WORKBENCH_MODES = ("router_input", "fitted")
# Keys that only label, score or say how an expert was made: the weights are the same without them.
LABEL_KEYS = ("name", "probe_prompts", "forge_data")


@dataclass(frozen=True)
class MergekitReading:
    stops: list[str] = field(default_factory=list)  # why mergekit-moe refuses or crashes, one phrase each
    flag: str | None = None  # the flag it needs to build this file
    ignored: list[str] = field(default_factory=list)  # keys it drops that change the model
    labels: list[str] = field(default_factory=list)  # keys it drops that only label or score

    @property
    def builds(self) -> bool:
        """mergekit-moe builds the model this file describes (with `flag` where one is named)."""
        return not self.stops and not self.ignored


def mergekit_reading(recipe: Recipe) -> MergekitReading:
    """What mergekit-moe 0.1.5 does with `dump_recipe(recipe)`; see the module doc."""
    stops = []
    if recipe.gate_mode in WORKBENCH_MODES:
        stops.append(f"`gate_mode: {recipe.gate_mode}` is the workbench's own (mergekit-moe crashes with "
                     "TypeError: 'NoneType' object is not callable)")
    for ref in recipe.model_refs():
        model, lora = split_ref(ref)
        if model.startswith(DEMO_PREFIX):
            stops.append(f"`{ref}` is a workbench name, not a folder or a Hub repo")
        if lora is not None:
            stops.append(f"`{ref}` applies a LoRA, which mergekit-moe never merges (AssertionError: LoRA "
                         "not merged)")
    prompted = recipe.gate_mode != "random"  # is_bad_config returns early in `random` mode only
    unprompted = [i for i, e in enumerate(recipe.experts) if not e.positive_prompts]
    if prompted and unprompted:  # mergekit stops there, before comparing prompt sets
        stops += [f"experts[{i}] has no positive prompts, which mergekit-moe needs in every mode but "
                  "`random`" for i in unprompted]
    elif prompted:
        sets = {(tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ())) for e in recipe.experts}
        if len(recipe.experts) == 1:
            stops.append("a single expert counts as every expert having the same prompts")
        elif len(sets) == 1:
            stops.append("every expert has the same prompts")
    same = len({e.source_model for e in recipe.experts}) == 1 and len(recipe.experts) > 1
    return MergekitReading(
        stops=stops,
        flag=ALL_SAME_FLAG if prompted and same else None,
        ignored=[k for k, used in (("center_gates", recipe.center_gates), ("prompt_template", recipe.chats))
                 if used],
        labels=[k for k in LABEL_KEYS if any(getattr(e, k) for e in recipe.experts)],
    )
