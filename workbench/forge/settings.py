"""What a forge is asked for: the training settings, checked before anything loads (no torch)."""

from __future__ import annotations

import math
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

    def check(self) -> None:
        if self.steps < 1:
            raise ForgeError(f"--steps is {self.steps}; train at least 1 step (20 change the demo model's "
                             "style)")
        if not (math.isfinite(self.lr) and 0 < self.lr <= 1e-2):
            raise ForgeError(f"--lr is {self.lr}; use a small positive rate such as 5e-5")
        if self.batch_size < 1:
            raise ForgeError(f"--batch-size is {self.batch_size}; use 1 or more")
