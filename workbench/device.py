"""Where tensors run: one place that turns a device name into (device, dtype).

Gates and chat both call this, so "auto" means the same thing everywhere: the GPU in
bfloat16 when there is one (the precision mergekit computes gates in, and half the
memory of float32), otherwise the CPU in float32 (bfloat16 matmuls on CPU are slow and
add rounding without saving anything that matters for a small model).
"""

from __future__ import annotations

import re

import torch

from workbench.errors import WorkbenchError

DEVICE_NAMES = ("auto", "cpu", "cuda")
_CUDA_NAME = re.compile(r"^cuda(?::(\d+))?$")


def pick_device(name: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Resolve "auto", "cpu", "cuda" or "cuda:N" to a device and its compute dtype.

    Raises WorkbenchError for an unknown name, or when CUDA is asked for and absent.
    """
    name = name.strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu"), torch.float32
    match = _CUDA_NAME.match(name)
    if match is None:
        raise WorkbenchError(f"unknown device {name!r}; use one of {', '.join(DEVICE_NAMES)} or cuda:N")
    if not torch.cuda.is_available():
        raise WorkbenchError(
            f"device {name!r} was requested but no CUDA GPU is visible to torch; "
            "use device 'auto' or 'cpu', or install a CUDA build of torch"
        )
    index = int(match.group(1) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise WorkbenchError(
            f"device {name!r} does not exist: torch sees {count} GPU(s); use cuda:0 to cuda:{count - 1}"
        )
    return torch.device("cuda", index), torch.bfloat16
