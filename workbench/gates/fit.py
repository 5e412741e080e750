"""Fitted gates: per layer, the linear router (E x H, no bias, as Mixtral's) that best tells
each expert's prompt tokens from the others', fitted on the router's real input.

The fit is L2-regularised multinomial logistic regression, solved by L-BFGS from zero, so it
is deterministic for the same states. Each expert's positive tokens carry the same total
weight whatever the prompts' lengths; the tokens of an expert's negative prompts add
-log(1 - p_e) (they are pushed away from that expert and towards none in particular).
Inputs are divided by their layer's RMS norm for the fit and the weights by it afterwards,
so one regularisation strength suits every layer and model. The logit scale is the fit's
own: the weights grow only as far as the data separate, so softmax weights are confident
where the router is sure and flat where it is not (unit-length prompt-mean rows are flat
everywhere).

The fit runs on one CPU thread. L-BFGS amplifies the reduction-order differences of a
multi-threaded sum into weights apart by ~1e-3 (2 threads against 1, the demo's bank), so
the routers would depend on how many threads the process had: a MoE routed with a recipe's
gates swapped in on the server could differ from the one its build wrote. Its tensors are
small, so one thread is also faster: 2.0 s against 6.4-8.4 s for the demo on two busy cores.

Legend: L layers, E experts, N tokens, H hidden size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from workbench.gates.bank import PromptBank

L2 = 1e-3  # penalty on the weights of the RMS-normalised inputs (held-out best on the demo, BENCHMARKS.md)
MAX_ITERATIONS = 100  # L-BFGS steps; the demo's fits converge in under 60


def fit_router(positives: Sequence[Tensor], negatives: Sequence[Tensor | None], *, l2: float = L2,
               device: str | torch.device = "cpu") -> Tensor:
    """(L, E, H) float32 CPU router weights from each expert's positive token states (L, N_e, H)
    and, where given, its negative ones (L, M_e, H)."""
    experts = len(positives)
    layers, _, hidden = positives[0].shape
    if experts < 2:  # one expert takes every token whatever its row
        return torch.zeros(layers, experts, hidden)
    x, y, w = _stack(positives, device)
    negs = [n if n is not None else positives[0][:, :0] for n in negatives]
    nx, ny, nw = _stack(negs, device) if any(n.shape[1] for n in negs) else (None, None, None)
    scale = x.square().sum(-1).mean(-1).sqrt().clamp(min=1e-8)[:, None, None]  # (L, 1, 1) RMS norm
    x = x / scale
    nx = nx / scale if nx is not None else None
    weight = torch.zeros(layers, experts, hidden, device=device, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight], lr=1, max_iter=MAX_ITERATIONS, tolerance_grad=1e-7,
                                  tolerance_change=1e-10, history_size=20, line_search_fn="strong_wolfe")

    def loss_fn() -> Tensor:
        optimiser.zero_grad()
        logits = torch.bmm(x, weight.transpose(1, 2))  # (L, N, E)
        loss = (torch.nn.functional.cross_entropy(logits.reshape(-1, experts), y.repeat(layers),
                                                  reduction="none") * w.repeat(layers)).sum()
        if nx is not None:
            nlog = torch.bmm(nx, weight.transpose(1, 2))  # (L, M, E)
            own = torch.nn.functional.one_hot(ny, experts).bool().expand_as(nlog)
            others = torch.logsumexp(nlog.masked_fill(own, float("-inf")), -1)  # log(1 - p_e) + lse
            loss = loss + ((torch.logsumexp(nlog, -1) - others) * nw).sum()
        loss = loss / layers + 0.5 * l2 * weight.square().sum() / layers
        loss.backward()
        return loss

    with one_thread():
        optimiser.step(loss_fn)
    return (weight.detach() / scale).float().cpu()


@contextmanager
def one_thread() -> Iterator[None]:
    """This thread's torch ops on one CPU thread inside the block (see the module doc)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fit_bank(bank: PromptBank, *, held: set[tuple[int, int]] = frozenset(),
             device: str | torch.device = "cpu") -> Tensor:
    """fit_router on a prompt bank's token states, without the `held` (expert, positive index) prompts."""
    experts = range(bank.experts)
    positives = [torch.cat([p.tokens for p in bank.of(e, "positive") if (e, p.index) not in held], 1)
                 for e in experts]
    negatives = [torch.cat([p.tokens for p in ns], 1) if (ns := bank.of(e, "negative")) else None
                 for e in experts]
    return fit_router(positives, negatives, device=device)


def _stack(per_expert: Sequence[Tensor], device: str | torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(L, N, H) states, (N,) expert labels, (N,) weights: each non-empty expert's tokens sum to 1/E."""
    present = [e for e, t in enumerate(per_expert) if t.shape[1]]
    x = torch.cat([per_expert[e] for e in present], dim=1).to(device, torch.float32)
    y = torch.cat([torch.full((per_expert[e].shape[1],), e) for e in present]).to(device)
    w = torch.cat([torch.full((per_expert[e].shape[1],), 1 / (len(per_expert) * per_expert[e].shape[1]))
                   for e in present]).to(device)
    return x, y, w
