"""EvoX problems: MergeProblem (merge coefficients -> validation scores) and cheap synthetic landscapes."""

from .landscapes import *  # noqa: F401,F403
from .landscapes import __all__ as _landscapes
from .merge_problem import MergeProblem

__all__ = ["MergeProblem", *_landscapes]
