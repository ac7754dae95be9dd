"""A problem wrapper the algorithm tests share: it scores a base landscape and keeps every population it was given."""

import torch
from evox.core import Problem


class Recording(Problem):
    """Evaluates a base landscape and keeps every population it was given."""

    def __init__(self, base: Problem):
        super().__init__()
        self.base = base
        self.populations: list[torch.Tensor] = []

    def evaluate(self, pop: torch.Tensor) -> torch.Tensor:
        self.populations.append(pop.clone())
        return self.base.evaluate(pop)
