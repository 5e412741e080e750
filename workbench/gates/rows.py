"""Gates as a build writes and reports them, without torch: router rows as bytes, and diagnostics.

A plain build copies gigabytes and needs torch for nothing but the gates; the gates can
then come from another process (`workbench.gates.process`), and this is the form they
cross in: each layer's (E, H) router weight already cast to the output dtype, and the
diagnostics as plain numbers. `from_gates` makes it from the tensors of
`Gates`; the card, the CLI and the build result read it.

The prompt-free modes (`random`, `uniform_random`) need no model at all, so they are made
here with numpy (`noise`): a build with them neither imports torch nor starts a child, and
`workbench.gates.compute` takes its noise from here too, so a preview and a build with the same
seed route alike. The diagnostics and the dtype cast are numpy for the same reason.

Dimensions: L layers, E experts, H hidden.
"""

from __future__ import annotations

import math

import numpy as np

from workbench.errors import BuildError, GateError
from workbench.gates.types import CONDITION_WARN, GateDiagnostics, Gates, HeldOutScore, RouterGates


def from_gates(gates: Gates, dtype: str) -> RouterGates:
    """Cast each layer's gates to the safetensors dtype `dtype`; refuses NaN or infinity."""
    vectors = gates.vectors.detach().float().cpu().numpy()  # (L, E, H)
    shared = gates.shared.detach().float().cpu().numpy() if gates.shared is not None else None  # (L, H)
    return from_array(vectors, gates.mode, dtype, gates.diagnostics, gates, gates.score, shared)


def from_array(vectors: np.ndarray, mode: str, dtype: str, diagnostics: GateDiagnostics | None = None,
               gates: Gates | None = None, score: HeldOutScore | None = None,
               shared: np.ndarray | None = None) -> RouterGates:
    """RouterGates from float32 (L, E, H) gates and, for Qwen2-MoE, the (L, H) shared-expert
    gate rows; diagnosed here unless `diagnostics` is given."""
    if not np.isfinite(vectors).all() or (shared is not None and not np.isfinite(shared).all()):
        raise BuildError("gates contain NaN or infinity; check the prompts and recompute them")
    rows = [cast(vectors[layer], dtype) for layer in range(vectors.shape[0])]
    shared_rows = None if shared is None else [cast(row[None], dtype) for row in shared]
    layers, experts, hidden = (int(n) for n in vectors.shape)
    diagnostics = diagnostics if diagnostics is not None else diagnose(vectors)
    return RouterGates(mode, (layers, experts, hidden), dtype, rows, diagnostics, gates, score, shared_rows)


def cast(matrix: np.ndarray, dtype: str) -> bytes:
    """Little-endian bytes of a float32 array in the safetensors dtype `dtype`, rounded to
    nearest even as torch's casts are (numpy has no bfloat16: its bits are the float32's
    upper half, rounded)."""
    matrix = np.ascontiguousarray(matrix, dtype="<f4")
    if dtype == "F32":
        return matrix.tobytes()
    if dtype == "F16":
        with np.errstate(over="ignore"):  # beyond half's range is infinity, as torch casts it
            return matrix.astype("<f2").tobytes()
    if dtype == "BF16":
        bits = matrix.view("<u4")
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2").tobytes()
    if dtype == "F64":
        return matrix.astype("<f8").tobytes()  # exact: every float32 is a float64
    raise BuildError(f"cannot write router rows as {dtype}; use BF16, F16, F32 or F64")


def noise(mode: str, shape: tuple[int, int, int], seed: int, stream: int = 0) -> np.ndarray:
    """(L, E, H) float32 seeded noise for a prompt-free mode: standard normal (`random`), or
    uniform in +-1/sqrt(H) (`uniform_random`); not normalised, as docs/recipe.md states them.
    `stream` 1 draws the shared expert's gate rows, independent of the routers' (stream 0)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise GateError(f"seed {seed!r} is not a whole number from 0 to 2**63 - 1; pass e.g. --seed 0")
    rng = np.random.default_rng([seed, stream] if stream else seed)
    if mode == "random":
        return rng.standard_normal(shape, dtype=np.float32)
    if mode == "uniform_random":
        scale = np.float32(1.0 / math.sqrt(shape[2]))
        return rng.uniform(-scale, scale, shape).astype(np.float32)
    raise GateError(f"gate mode {mode!r} needs the base model; only random and uniform_random are noise")


def noise_gates(mode: str, shape: tuple[int, int, int], seed: int, dtype: str, *,
                shared: bool = False) -> RouterGates:
    """A prompt-free mode's gates, ready to write, in microseconds and without torch; with
    `shared`, a shared-expert gate row per layer too (Qwen2-MoE)."""
    layers, _, hidden = shape
    rows = noise(mode, (layers, 1, hidden), seed, stream=1)[:, 0] if shared else None
    return from_array(noise(mode, shape, seed), mode, dtype, shared=rows)


def diagnose(vectors: np.ndarray, *, shift_invariant: bool = False) -> GateDiagnostics:
    """Condition number and expert-expert cosine per layer of (L, E, H) gates, in float64.

    The condition number is mergekit's, of the rows as they are. With `shift_invariant` it is
    that of the rows minus their mean, over its E - 1 directions: a softmax router ignores
    a vector added to every row, and rows that sum to zero (fitted or centred gates) span
    only E - 1 directions, so the plain number would be infinite for rows that route well.
    """
    v = np.asarray(vectors, dtype=np.float64)
    layers, experts, _ = v.shape
    conditions = [1.0] * layers
    if experts > 2 or (experts == 2 and not shift_invariant):
        rows = v - v.mean(axis=1, keepdims=True) if shift_invariant else v
        s = np.linalg.svd(rows, compute_uv=False)  # (L, min(E, H)), descending
        low = min(s.shape[1], experts - 1) - 1 if shift_invariant else -1
        conditions = [float(top / small) if small > 0 else math.inf for top, small in s[:, [0, low]]]
    unit = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-8)
    cosine = (unit @ unit.transpose(0, 2, 1)).astype(np.float32)  # (L, E, E)
    warnings = [
        f"layer {layer}: condition number {c:.3g} > {CONDITION_WARN:g}: prompts too similar, the router "
        "may not tell these experts apart; make the experts' prompt sets more distinct"
        for layer, c in enumerate(conditions)
        if c > CONDITION_WARN
    ]
    return GateDiagnostics(conditions, cosine.tolist(), cosine.mean(axis=0).tolist(), warnings)
