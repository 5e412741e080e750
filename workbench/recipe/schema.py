"""The recipe's data types: the schema of a frankenMoE design, its problems, and its caps.

A recipe that mergekit-moe (0.1.x) accepts loads here with the same meaning (docs/recipe.md).
These types are what the other recipe modules (and every stage) hand each other:
`Recipe`/`Expert` (pydantic, `extra="forbid"`), `Problem` (key path, what, how to fix) and
`ConfigUnavailable` (a config.json that could not be read).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from workbench.errors import WorkbenchError

GateMode = Literal["hidden", "hidden_avg", "cheap_embed", "random", "uniform_random", "router_input",
                   "fitted"]
DType = Literal["bfloat16", "float16", "float32", "float64"]  # mergekit 0.1.5 takes float64
Architecture = Literal["mixtral", "qwen", "deepseek"]
# How a router prompt becomes tokens: "plain" is mergekit's (BOS text + the prompt), "chat" renders
# it as a user's message through the base's chat template, the tokens a chat sends.
PromptTemplate = Literal["plain", "chat"]

GATE_MODES: tuple[str, ...] = GateMode.__args__
DTYPES: tuple[str, ...] = DType.__args__
ARCHITECTURES: tuple[str, ...] = Architecture.__args__
PROMPT_TEMPLATES: tuple[str, ...] = PromptTemplate.__args__
# Modes whose gates do not come from prompts: prompts are optional there.
PROMPTLESS_MODES = ("random", "uniform_random")
# Modes whose rows are unit vectors of mean prompt states (mergekit's, and router_input):
# `center_gates` applies to them. `fitted` rows come from a fitted linear router instead.
PROMPT_MEAN_MODES = ("hidden", "hidden_avg", "cheap_embed", "router_input")
GATE_MODE_ALIASES = {"hidden_last": "hidden"}
DTYPE_HINTS = {
    "bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
    "float": "float32", "f16": "float16", "f32": "float32", "fp64": "float64", "f64": "float64",
    "double": "float64",
}

# Caps that keep one recipe from exhausting the machine (docs/reliability.md).
MAX_YAML_BYTES = 256 * 1024
MAX_EXPERTS = 64
MAX_PROMPTS_PER_SET = 64
MAX_PROMPT_CHARS = 4000


class Expert(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source_model: str
    name: str | None = None  # workbench extension: what plots, tables and the card call it
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    # workbench extension: held-out texts this expert should take, scored but never fitted on
    probe_prompts: list[str] | None = None
    # workbench extension: the examples source_model is forged from (a shipped set's name, or a
    # JSON-lines file), so a missing forged expert can be made with one command or click
    forge_data: str | None = None
    noise_scale: float | None = None
    residual_scale: float | None = None


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_model: str
    experts: list[Expert] = Field(min_length=1)
    gate_mode: GateMode = "hidden"
    # workbench extension: subtract the mean row over experts before normalising (prompt-mean modes)
    center_gates: bool | None = None
    # workbench extension: "chat" renders every router prompt as a chat sends a user's message
    prompt_template: PromptTemplate | None = None
    dtype: DType | None = None
    experts_per_token: int = 2
    architecture: Architecture | None = None
    shared_experts: list[Expert] | None = None

    @property
    def family(self) -> str:
        """The output family: `architecture`, else Mixtral (mergekit's default for these inputs)."""
        return self.architecture or "mixtral"

    @property
    def chats(self) -> bool:
        """Router prompts are rendered as chat messages (`prompt_template: chat`)."""
        return self.prompt_template == "chat"

    def shared_gate_recipe(self) -> Recipe | None:
        """The one-expert recipe whose gate row is Qwen2-MoE's `shared_expert_gate`, or None.

        mergekit computes that row as one more expert's (`gates[:, E:]`), so for its modes it is
        the row of a recipe holding only the shared expert. A fitted router has no row for an
        always-on expert, so `fitted` makes it as `router_input` does; centring one row would
        leave zero, so it is never centred."""
        if self.family != "qwen" or not self.shared_experts:
            return None
        mode = "router_input" if self.gate_mode == "fitted" else self.gate_mode
        return Recipe(base_model=self.base_model, experts=[self.shared_experts[0]], gate_mode=mode,
                      experts_per_token=1, dtype=self.dtype, architecture="mixtral",
                      prompt_template=self.prompt_template)

    def experts_copy_the_base(self) -> bool:
        """Every expert is the base model unchanged (no noise, no residual scale): the MoE then
        computes as the base at every layer, so a preview from the base's states is exact."""
        return all(e.source_model == self.base_model and not e.noise_scale and e.residual_scale in (None, 1)
                   for e in self.experts)

    def expert_labels(self) -> list[str]:
        """What every plot, table and card calls each expert: its `name`; else the gist of its
        first positive prompt ("Write a Python function…"); else its source model's name.
        Labels that come out equal get " (2)", " (3)" so a legend can tell them apart."""
        labels, seen = [], {}
        for expert in self.experts:
            label = (expert.name or "").strip() or _gist(expert.positive_prompts) or \
                expert.source_model.rstrip("/").split("/")[-1]
            seen[label] = seen.get(label, 0) + 1
            labels.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
        return labels

    def workbench_extensions(self) -> list[str]:
        """The workbench-only keys this recipe uses (mergekit-moe 0.1.x ignores or refuses them)."""
        used = [f"gate_mode: {self.gate_mode}"] if self.gate_mode in ("router_input", "fitted") else []
        used += ["center_gates"] if self.center_gates else []
        used += ["prompt_template: chat"] if self.chats else []
        for key in ("name", "probe_prompts", "forge_data"):
            used += [key] if any(getattr(e, key) for e in self.experts) else []
        return used

    def model_refs(self) -> list[str]:
        """Every distinct model reference, base first, in recipe order (shared experts last)."""
        refs = [self.base_model] + [e.source_model for e in self.experts + (self.shared_experts or [])]
        return list(dict.fromkeys(refs))


def _gist(prompts: list[str] | None, words: int = 4, chars: int = 28) -> str:
    """The first few words of the first non-empty prompt, on one line."""
    text = " ".join(next((p for p in prompts or [] if p.strip()), "").split())
    short = " ".join(text.split(" ")[:words])
    short = short if len(short) <= chars else short[:chars - 1].rstrip()
    return short + ("…" if short != text else "")


MAX_NAME_CHARS = 40


Level = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    level: Level
    path: str  # key path: "experts[1].positive_prompts", "" for the whole recipe
    message: str  # what is wrong
    fix: str = ""  # how to fix it

    def __str__(self) -> str:
        where = self.path or "recipe"
        tail = f" Fix: {self.fix}" if self.fix else ""
        return f"{self.level}: {where}: {self.message}.{tail}"

    def to_dict(self) -> dict[str, str]:
        return {"level": self.level, "path": self.path, "message": self.message, "fix": self.fix}


@dataclass(frozen=True)
class ConfigUnavailable:
    """A model's config.json could not be read; `level` says whether that blocks a build."""

    reason: str
    level: Level = "error"
    fix: str = ""  # how to fix it, where the reason does not already say


def errors(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.level == "error"]


class RecipeError(WorkbenchError):
    """A recipe that cannot be used; carries every problem found."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))
