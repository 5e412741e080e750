"""ZeroGPU support: GPU work is decorated with `spaces.GPU` when the `spaces` package exists.

On a Hugging Face ZeroGPU Space a GPU is attached only while a function decorated with
`spaces.GPU` runs; everywhere else (a laptop, a Docker Space, a dedicated GPU) the
package is absent and `gpu()` returns the function unchanged, so nothing changes.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def zero_gpu_available() -> bool:
    """True where the `spaces` package can be imported (ZeroGPU Spaces install it)."""
    if os.environ.get("MOE_WORKBENCH_NO_SPACES") == "1":  # lets a test or a user opt out
        return False
    return importlib.util.find_spec("spaces") is not None


def gpu(fn: F | None = None, *, duration: int = 60) -> F | Callable[[F], F]:
    """Decorate GPU work for ZeroGPU: `@gpu` or `@gpu(duration=120)`; a no-op without `spaces`.

    `duration` is the longest the GPU is held per call, in seconds (ZeroGPU's quota unit).
    """

    def decorate(func: F) -> F:
        if not zero_gpu_available():
            return func
        import spaces  # imported only here: on ZeroGPU it must come before CUDA is touched

        log.info("ZeroGPU: %s runs on a GPU for up to %d s per call", func.__qualname__, duration)
        return spaces.GPU(duration=duration)(func)

    return decorate(fn) if fn is not None else decorate
