"""EvoX algorithms for merge-coefficient search: EvoGM, bounded CMA-ES and PSO wrappers, uniform random search.

All share one constructor shape, `Algo(num_experts, pop_size=20, lb=-1.0, ub=1.0, seed=0, ...)`, and one budget
convention (one step = one generation of `pop_size` evaluations; `init_step` evaluates the first population), and
minimise: run them in `evox.workflows.StdWorkflow(algo, problem, opt_direction="max")` for higher-is-better scores.
"""

from .cmaes import BoundedCMAES
from .evogm import EvoGM
from .evogm_history import EvoGMHistory
from .evogm_variants import VARIANTS, EvoGMSwitches
from .generators import GeneratorPair
from .pso import BoundedPSO
from .random_search import RandomSearch

__all__ = [
    "VARIANTS", "BoundedCMAES", "BoundedPSO", "EvoGM", "EvoGMHistory", "EvoGMSwitches", "GeneratorPair", "RandomSearch",
]
