"""Live progress of a search: a tqdm bar, JSON lines for machines, or nothing."""

from __future__ import annotations

import json
import sys
import time
from typing import Literal

from tqdm.auto import tqdm

ProgressMode = Literal["bar", "json", "quiet"]


class SearchProgress:
    """Reports each generation: evaluations done of the budget, best and median fitness, time per candidate, ETA."""

    def __init__(self, budget: int, mode: ProgressMode = "bar", done: int = 0) -> None:
        self.budget = budget
        self.mode = mode
        self.done = done
        self._start = time.perf_counter()
        self._start_done = done
        self._bar = tqdm(total=budget, initial=done, unit="cand", dynamic_ncols=True) if mode == "bar" else None

    def update(self, generation: int, evaluated: int, best: float, median: float, seconds_per_candidate: float) -> None:
        """One generation of `evaluated` candidates is done."""
        self.done += evaluated
        rate = (time.perf_counter() - self._start) / max(self.done - self._start_done, 1)
        eta = max(self.budget - self.done, 0) * rate
        if self._bar is not None:
            self._bar.set_postfix(gen=generation, best=f"{best:.4f}", median=f"{median:.4f}",
                                  s_per_cand=f"{seconds_per_candidate:.3f}", refresh=False)
            self._bar.update(evaluated)
        elif self.mode == "json":
            line = {"generation": generation, "evaluations": self.done, "budget": self.budget, "best": best,
                    "median": median, "seconds_per_candidate": seconds_per_candidate, "eta_seconds": round(eta, 1)}
            print(json.dumps(line), file=sys.stdout, flush=True)

    def close(self) -> None:
        """End the display."""
        if self._bar is not None:
            self._bar.close()
