"""A zoo expert's adapter shape (rank, alpha, target modules), shared by every preset."""

from __future__ import annotations

from dataclasses import dataclass

STANDARD_TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraShape:
    """An expert's adapter: LoRA rank, alpha and the Linear layers it targets."""

    rank: int
    alpha: int
    target_modules: tuple[str, ...] = STANDARD_TARGETS
