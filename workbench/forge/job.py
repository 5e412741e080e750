"""A forge as a queued job (`workbench.jobs` runs it in a child process): the request's fields in,
a JSON-ready result out (the folder, the loss curve, sample replies of base and expert)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from workbench.forge.data import parse_examples
from workbench.forge.expert import forge_expert
from workbench.forge.samples import sample_replies
from workbench.forge.settings import ForgeSettings
from workbench.progress import CancelToken, ProgressFn, ignore_progress


def forge_job(*, base: str, examples: str, out: str, steps: int, lr: float, batch_size: int, seed: int,
              layers: Sequence[int] | None = None, device: str = "auto", force: bool = False,
              samples: Sequence[str] = (), token: str | None = None,
              on_progress: ProgressFn = ignore_progress, cancel: CancelToken | None = None) -> dict[str, Any]:
    """Forge `base` on the JSON-lines `examples` into `out`, then answer `samples` with both."""
    settings = ForgeSettings(steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                             layers=(int(layers[0]), int(layers[1])) if layers else None)
    result = forge_expert(base, parse_examples(examples.encode("utf-8")), Path(out), settings, device=device,
                          force=force, token=token, on_progress=on_progress, cancel=cancel)
    replies: list[dict[str, str]] = []
    if samples:
        replies = sample_replies(base, result.path, samples, device=device, token=token, cancel=cancel,
                                 on_progress=on_progress)
    return {"path": str(result.path), "losses": result.losses, "seconds": result.seconds,
            "examples": result.examples, "samples": replies}
