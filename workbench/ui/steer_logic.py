"""The Chat tab's Interventions panel as plain functions: its values, their words, their routers.

The panel's values travel between handlers as a small dict (a "spec": the forced expert and
its layers, banned and ablated experts, top-k, router temperature, which routers); nothing
heavy is kept per session. On the engine side `resolve` turns a spec into an `Intervention`
for the loaded MoE, with the Design tab's recipe's routers when the spec asks for them: the
gates come from the Preview tab's cache (keyed by what gates depend on), so a prompt edit
recomputes them once and every later reply with that recipe reuses them.

A recipe's routers are numbered per session by revision: the first recipe whose routers this
session used is revision 1, the next different one (another prompt, another gate mode) 2.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from workbench.recipe import Recipe, parse_recipe, routed_experts
from workbench.routing import Force, Intervention, parse_layers

log = logging.getLogger(__name__)

SAVED, RECIPE = "saved", "recipe"
ROUTER_CHOICES = [("the build's saved routers", SAVED), ("the Design tab's recipe (unsaved)", RECIPE)]
RECIPE_COPY = "mergekit_moe_config.yml"
NO_FORCE = -1  # the Force dropdown's "nobody"


def spec(force: Any = None, layers: str = "", ban: Any = (), ablate: Any = (), top_k: Any = 0,
         temperature: Any = 1.0, routers: str = SAVED, revision: int = 0) -> dict[str, Any]:
    """The panel's values as a plain dict (what handlers pass on and the Routing tab keeps)."""
    forced = None if force in (None, "", NO_FORCE) else int(force)
    return {"force": forced, "layers": str(layers or "").strip(), "ban": sorted({int(e) for e in ban or ()}),
            "ablate": sorted({int(e) for e in ablate or ()}), "top_k": int(top_k or 0) or None,
            "temperature": float(temperature if temperature not in (None, "") else 1.0),
            "routers": RECIPE if routers == RECIPE else SAVED, "revision": int(revision or 0)}


def intervention_of(values: dict[str, Any]) -> Intervention:
    """The spec's Intervention, without routers (a bad layer range raises InterventionError)."""
    force = ()
    if values.get("force") is not None:
        force = (Force(int(values["force"]), *parse_layers(values.get("layers", ""))),)
    return Intervention(force=force, ban=tuple(values.get("ban") or ()),
                        ablate=tuple(values.get("ablate") or ()), top_k=values.get("top_k"),
                        temperature=float(values.get("temperature", 1.0)))


def routers_words(values: dict[str, Any]) -> str:
    revision = values.get("revision") or 0
    return f"the unsaved recipe (revision {revision})" if revision else "the unsaved recipe"


def active(values: dict[str, Any] | None) -> bool:
    """Whether the spec changes anything (a bad one counts: it must be reported, not skipped)."""
    if not values:
        return False
    if values.get("routers") == RECIPE:
        return True
    try:
        return intervention_of(values).active
    except Exception:  # noqa: BLE001 (a bad layer range is a change the user asked for)
        return True


def describe(values: dict[str, Any] | None, names: list[str] | None = None) -> str:
    """The label of a reply under this spec: "e3 (chit-chat) banned · routers from the unsaved
    recipe (revision 2)", or "no intervention (the saved routers)"."""
    if not values:
        return "no intervention (the saved routers)"
    words = intervention_of(values).describe(names)
    if values.get("routers") == RECIPE:
        routers = f"routers from {routers_words(values)}"
        words = routers if words == "no intervention" else f"{words} · {routers}"
    return "no intervention (the saved routers)" if words == "no intervention" else words


def moe_facts(folder: str | None) -> tuple[list[str], tuple[int, int, int] | None]:
    """(expert labels, (layers, experts, top-k)) of a built MoE folder, read from its files (no
    model load); ([], None) when it is not one."""
    if not folder:
        return [], None
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        shape = (int(config["num_hidden_layers"]), routed_experts(config),
                 int(config.get("num_experts_per_tok") or 2))
    except (OSError, ValueError, KeyError, TypeError):
        return [], None
    if not shape[1]:  # a dense model: no experts to steer
        return [], None
    names = [f"expert {e}" for e in range(shape[1])]
    try:
        recipe, _ = parse_recipe((Path(folder) / RECIPE_COPY).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        recipe = None
    if recipe is not None and len(recipe.experts) == shape[1]:
        names = recipe.expert_labels()
    return names, shape


def expert_choices(folder: str | None) -> list[tuple[str, int]]:
    names, _ = moe_facts(folder)
    return [(f"e{e} {name}", e) for e, name in enumerate(names)]


def problems(values: dict[str, Any], folder: str | None) -> list[str]:
    """What keeps the spec from applying to the MoE in `folder`, before anything loads."""
    _, shape = moe_facts(folder)
    try:
        intervention = intervention_of(values)
    except Exception as exc:  # noqa: BLE001 (InterventionError: shown as it is)
        return [str(exc)]
    return intervention.problems(*shape[:2]) if shape is not None else []


def panel_note(values: dict[str, Any], folder: str | None) -> str:
    """The line under the panel: what the third pane's next reply runs under, or what is wrong."""
    found = problems(values, folder)
    if found:
        return "**Cannot apply:** " + "; ".join(found)
    names, _ = moe_facts(folder)
    words = describe(values, names)
    tail = (" They are computed as you edit the Design tab (once the typing pauses); build the recipe "
            "on the Build tab to save them for real." if values.get("routers") == RECIPE else "")
    return f"The third pane answers under: **{words}**.{tail}"


# ---- recipe revisions ----------------------------------------------------------------------


def fingerprint(recipe: Recipe) -> str:
    """What a recipe's routers depend on: base, gate mode, centring, top-k, every prompt and how
    prompts are rendered."""
    facts = {"base": recipe.base_model, "mode": recipe.gate_mode, "center": bool(recipe.center_gates),
             "k": recipe.experts_per_token, "dtype": recipe.dtype, "chat": recipe.chats,
             "experts": [[e.positive_prompts, e.negative_prompts] for e in recipe.experts]}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def revision(yaml_text: str, seen: list[str] | None) -> tuple[int, list[str]]:
    """(this recipe's revision in the session, the session's revisions after it); (0, seen) for
    a recipe that does not parse (the reply then says what is wrong with it)."""
    seen = list(seen or [])
    recipe, _ = parse_recipe(yaml_text or "")
    if recipe is None:
        return 0, seen
    mark = fingerprint(recipe)
    if mark not in seen:
        seen.append(mark)
    return seen.index(mark) + 1, seen


def steer_of(controls: tuple | list, yaml_text: str, seen: list[str] | None) -> dict[str, Any]:
    """{"spec", "yaml"} for the panel's controls now (as a reply sent now would run)."""
    routers = controls[6] if len(controls) > 6 else SAVED
    number = revision(yaml_text, seen)[0] if routers == RECIPE else 0
    return {"spec": spec(*controls, revision=number), "yaml": yaml_text}


# ---- the recipe's routers, ahead of the reply -----------------------------------------------

PREFETCH_AFTER = 1.5  # seconds without an edit before a recipe's routers are computed ahead
_timers: dict[str, threading.Timer] = {}
_timers_lock = threading.Lock()


def prefetch(session: str, yaml_text: str, *, token: str | None = None, device: str = "auto",
             delay: float = PREFETCH_AFTER) -> threading.Timer:
    """Compute the recipe's routers ahead, `delay` seconds after this session's last edit, so
    that a reply sent later finds them ready (and one sent meanwhile waits for them rather
    than computing them again); another edit first restarts the wait. A recipe that does not
    check out is left for the reply to report."""
    def run() -> None:
        with _timers_lock:
            if _timers.get(session) is not timer:
                return  # a newer edit took over
            del _timers[session]
        try:
            from workbench.ui import preview_logic

            recipe = preview_logic.recipe_for_preview(yaml_text)
            preview_logic.gates_for(recipe, preview_logic.base_entry(recipe, token=token, device=device))
        except Exception as exc:  # noqa: BLE001 (the reply reports it, with what to fix)
            log.debug("routers not computed ahead: %s", exc)

    timer = threading.Timer(delay, run)
    timer.daemon = True
    with _timers_lock:
        old = _timers.pop(session, None)
        if old is not None:
            old.cancel()
        _timers[session] = timer
    timer.start()
    return timer


# ---- on the engine side --------------------------------------------------------------------


def resolve(values: dict[str, Any], yaml_text: str, moe: Any, *, token: str | None = None,
            device: str = "auto", cancel: Any = None) -> tuple[Intervention, list[str], float | None]:
    """(the Intervention for the loaded MoE `moe`, notes on swapped routers, seconds the routers took:
    None when the saved routers stay)."""
    from workbench.chat import saved_recipe
    from workbench.routing import recipe_routers, swap_notes
    from workbench.ui import preview_logic

    started = time.perf_counter()
    intervention = intervention_of(values)
    if values.get("routers") != RECIPE:
        return intervention, [], None
    recipe = preview_logic.recipe_for_preview(yaml_text)
    base = preview_logic.base_entry(recipe, token=token, device=device)
    gates = preview_logic.gates_for(recipe, base, cancel)  # cached when the preview already ran them
    routers = recipe_routers(recipe, gates, moe, base_path=base.path)
    k = recipe.experts_per_token  # a build of the recipe routes its own top-k
    intervention = intervention.with_routers(routers, routers_words(values), k=k if k != moe.top_k else None)
    return intervention, swap_notes(recipe, saved_recipe(moe.path)), time.perf_counter() - started
