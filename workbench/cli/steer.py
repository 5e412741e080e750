"""CLI router interventions for `trace` and `chat`: the arguments, and the Intervention they make.

    --force-expert E[@A-B]  --ban-expert E  --ablate-expert E  --router-top-k K
    --router-temperature T  --gates-from RECIPE

They apply to the loaded model for this run only; nothing is built or written. With
`--gates-from`, the routers come from RECIPE's gates, computed from its base model exactly
as a build would write them (random gate modes with seed 0, a build's default).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from workbench.models import env_token
from workbench.recipe import routed_experts


def _force(text: str) -> Any:
    from workbench.routing import InterventionError, parse_force

    try:
        return parse_force(text)
    except InterventionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _expert(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not an expert number (0, 1, ...)")
    return value


def add_intervention_args(cmd: argparse.ArgumentParser, *, top_k_alias: bool) -> None:
    """The router interventions `trace` and `chat` take, applied for this run only."""
    group = cmd.add_argument_group("router interventions (this run only; the model is not changed)")
    group.add_argument("--force-expert", type=_force, action="append", metavar="E[@A-B]",
                       help="send every token to expert E alone (weight 1), on layers A to B or all; "
                       "repeat for other layers")
    group.add_argument("--ban-expert", type=_expert, action="append", metavar="E",
                       help="the router picks among the other experts; repeatable")
    group.add_argument("--ablate-expert", type=_expert, action="append", metavar="E",
                       help="reply without expert E: its share of each token is dropped; repeatable")
    names = ["--router-top-k", "--top-k"] if top_k_alias else ["--router-top-k"]
    group.add_argument(*names, dest="router_top_k", type=int, metavar="K",
                       help="experts per token (default: the model's, or the --gates-from recipe's)")
    group.add_argument("--router-temperature", type=float, default=1.0, metavar="T",
                       help="router logits divided by T before the softmax (default 1: unchanged)")
    group.add_argument("--gates-from", metavar="RECIPE",
                       help="route with the gates of RECIPE (computed from its base, as a build would "
                       "write them), without building or writing anything")


def intervention_from(args: argparse.Namespace, entry: Any) -> tuple[Any, list[str]]:
    """The run's Intervention (None when it changes nothing) and notes on swapped routers."""
    from workbench.errors import WorkbenchError
    from workbench.routing import Intervention

    intervention = Intervention(force=tuple(args.force_expert or ()), ban=tuple(args.ban_expert or ()),
                                ablate=tuple(args.ablate_expert or ()), top_k=args.router_top_k,
                                temperature=args.router_temperature)
    notes: list[str] = []
    if args.gates_from:
        from workbench.chat import registry, saved_recipe
        from workbench.gates import compute_gates
        from workbench.recipe import read_recipe
        from workbench.routing import recipe_routers, swap_notes

        recipe, problems = read_recipe(args.gates_from)
        for problem in problems:
            print(problem, file=sys.stderr)
        base = registry().get(recipe.base_model, device=args.device, token=env_token())
        gates = compute_gates(recipe, base.path, model=base.model, tokenizer=base.tokenizer)
        routers = recipe_routers(recipe, gates, entry, base_path=base.path)
        k = recipe.experts_per_token  # a build of the recipe routes its own top-k
        intervention = intervention.with_routers(routers, f"{args.gates_from} (not built)",
                                                 k=k if k != entry.top_k else None)
        notes = swap_notes(recipe, saved_recipe(entry.path))
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    if not intervention.active:
        return None, notes
    if not entry.is_moe:
        raise WorkbenchError(f"{entry.ref} is not a MoE: there are no routers to steer")
    intervention.check(entry.layers, routed_experts(entry.model.config))
    return intervention, notes

