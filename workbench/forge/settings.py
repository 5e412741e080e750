"""What a forge is asked for: the training settings, checked before anything loads (no torch)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from workbench.errors import ForgeError


@dataclass(frozen=True)
class ForgeSettings:
    # 20 steps give every shipped set's style on 10 of 10 unseen prompts, as 30 do (BENCHMARKS.md)
    steps: int = 20
    lr: float = 5e-5
    batch_size: int = 4
    seed: int = 0
    layers: tuple[int, int] | None = None  # first and last layer trained (inclusive); all when None
    max_tokens: int = 512  # per example, prompt and reply together

    def check(self, names: Mapping[str, str] | None = None) -> None:
        """Refuse settings no forge can run, each named as the caller shows it (`names`: the CLI's
        flags by default, the app's field labels from the Forge tab)."""
        name = {**CLI_NAMES, **(names or {})}
        if self.steps < 1:
            raise ForgeError(f"{name['steps']} is {self.steps}; train at least 1 step (20 change the demo "
                             "model's style)")
        if not (math.isfinite(self.lr) and 0 < self.lr <= 1e-2):
            raise ForgeError(f"{name['lr']} is {self.lr}; use a small positive rate such as 5e-5")
        if self.batch_size < 1:
            raise ForgeError(f"{name['batch_size']} is {self.batch_size}; use 1 or more")


CLI_NAMES = {"steps": "--steps", "lr": "--lr", "batch_size": "--batch-size"}
