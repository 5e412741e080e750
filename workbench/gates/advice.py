"""What a held-out routing score means, in plain words, with what to do about it.

Reads only numbers (`HeldOutScore`, `GateDiagnostics`) and expert labels, so the CLI, the
Preview tab and the card say the same thing. No torch.
"""

from __future__ import annotations

from workbench.gates.types import GateDiagnostics, HeldOutScore

DOMINANT = 0.9  # a few experts taking this share of all first choices crowd out the rest
CLOSE_ROWS = 0.5  # mean cosine above which rows are said to share a direction
NEAR_CHANCE = 0.05


def _name(names: list[str], e: int) -> str:
    return f"e{e} ({names[e]})"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def explain(score: HeldOutScore, diagnostics: GateDiagnostics | None, names: list[str]) -> list[str]:
    """Sentences on what the score shows, most important first; empty when routing follows the prompts."""
    if score.top1 is None:
        return ["nothing could be held out to score the routing: give each expert two or more positive "
                "prompts, or probe_prompts (texts it should take, never fitted on)"]
    out: list[str] = []
    fixable = score.mode not in ("fitted", "random", "uniform_random") and not score.center
    scored = [i for i, n in enumerate(score.tokens) if n]
    experts = score.experts
    if score.top1 <= score.chance_top1 + NEAR_CHANCE:
        out.append(f"top-1 {score.top1:.2f} is about chance ({score.chance_top1:.2f}): the router ignores "
                   "what the prompts are about")
    share = [sum(score.matrix[i][j] for i in scored) / len(scored) for j in range(experts)]
    order = sorted(range(experts), key=lambda j: -share[j])
    winners, total = [], 0.0
    for j in order:
        if total >= DOMINANT:
            break
        winners.append(j)
        total += share[j]
    if experts > 2 and len(winners) <= experts // 2 and total >= DOMINANT:
        text = f"{_join([_name(names, j) for j in winners])} win {total:.0%} of held-out tokens"
        if len(winners) > 1 and diagnostics is not None:
            pairs = [diagnostics.mean_cosine[a][b] for a in winners for b in winners if a < b]
            cosine = sum(pairs) / len(pairs)
            if cosine > CLOSE_ROWS:
                text += f": their rows share the direction common to all text (cosine {cosine:.2f})"
        fix = "add negative prompts or use a centred or fitted mode" if fixable else \
            "make the other experts' prompts more distinct"
        out.append(f"{text}; {fix}")
    for i in scored:
        row = score.matrix[i]
        j = max(range(experts), key=lambda c: row[c])
        if j != i and row[j] >= 0.4 and row[i] < 0.5:
            out.append(f"most of {_name(names, i)}'s held-out tokens go to {_name(names, j)} ({row[j]:.0%})")
    unscored = [_name(names, i) for i in range(experts) if i not in scored]
    if unscored:
        verb = "has" if len(unscored) == 1 else "have"
        out.append(f"{_join(unscored)} {verb} a single positive prompt and no probe prompts, so nothing "
                   "of it is scored: add prompts")
    return out
