"""Which worker computes a build's gates: given ones, a child process, or a thread.

A build copies gigabytes that need no torch; only its gates do. `start_gates` picks the
cheapest worker that can give them while the copy runs (see `workbench.gates.thread`
and `workbench.gates.process`), and the build waits on its `result` only at the routers.
"""

from __future__ import annotations

import sys

from workbench.gates.process import GateProcess, GateRequest
from workbench.gates.rows import from_gates
from workbench.gates.thread import Compute, GateThread, GateWorker, ReadyGates
from workbench.gates.types import RouterGates
from workbench.progress import CancelToken, ProgressFn


def start_gates(request: GateRequest, given: RouterGates | None, cancel: CancelToken) -> GateWorker:
    """The gates worker: given gates (or noise, made before the build starts) as they are;
    else a child process where this one has not imported torch (a CLI build then never
    does), or a thread where the import is already paid."""
    if given is not None:
        return ReadyGates(given, cancel)
    if "torch" not in sys.modules:
        return GateProcess(request, cancel)
    return GateThread(_compute(request), cancel)


def _compute(request: GateRequest) -> Compute:
    """What the gates thread runs: the gates computed from the base model."""
    def compute(on_progress: ProgressFn, cancel: CancelToken) -> RouterGates:
        from workbench.gates.score import scored_gates  # torch is loaded already (start_gates)

        gates = scored_gates(request.recipe, request.base_path, device=request.device, seed=request.seed,
                              on_progress=on_progress, cancel=cancel)
        return from_gates(gates, request.dtype)
    return compute
