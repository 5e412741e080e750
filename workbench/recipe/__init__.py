"""Recipe: a design as YAML in, a checked `Recipe` and every `Problem` out.

Takes recipe text (mergekit-moe's format, docs/recipe.md) or the form's values, and the base's
and experts' config.json as plain dicts; gives a pydantic `Recipe`, YAML back, and the
problems of both (key path, what is wrong, how to fix it). Touches no torch and no file
but the YAML.

    schema    Recipe, Expert, Problem, ConfigUnavailable, caps
    parse     YAML load / dump, structural checks
    checks    validate(): counts, prompts, expert settings
    families  output families (Mixtral, Qwen2-MoE, DeepSeek-MoE) and their shared-expert rules
    compat    experts against the base, from config.json
    safe_yaml YAML with nesting depth and alias expansion capped
    edit      an edit written into the user's YAML, comments and layout kept
    refs      model references in mergekit's forms (dict, model+lora) as one string each
    mergekit  what mergekit-moe 0.1.5 does with a recipe: builds it, needs a flag, or stops
"""

from workbench.faces import face

EXPORTS = {
    "ConfigUnavailable": "schema", "Expert": "schema", "GATE_MODES": "schema",
    "PROMPT_MEAN_MODES": "schema", "PROMPTLESS_MODES": "schema",
    "Problem": "schema", "Recipe": "schema", "RecipeError": "schema",
    "errors": "schema",
    "dump_recipe": "parse", "load_recipe": "parse", "parse_recipe": "parse", "read_recipe": "parse",
    "recipe_from_dict": "parse", "load_yaml": "safe_yaml", "patch_yaml": "edit",
    "validate": "checks", "forge_command_data": "compat",
    "DEMO_PREFIX": "refs", "split_ref": "refs",
    "MergekitReading": "mergekit", "mergekit_reading": "mergekit",
    "FAMILY_LABELS": "families", "routed_experts": "families",
    "ARCHITECTURES": "schema", "PROMPT_TEMPLATES": "schema",
}
__getattr__, __dir__ = face(__name__, EXPORTS)
