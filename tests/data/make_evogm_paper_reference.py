"""Reference trajectories of paper EvoGM for tests/test_evogm.py (python tests/data/make_evogm_paper_reference.py).

evogm_paper_reference.json was made by this script on git 13b3276, before EvoGM had variants (the constructor then
took no `variant`; today the script passes variant="paper", which must give the same file).
"""
import json, torch
from evox.workflows import StdWorkflow
from evox_merge.algorithms import EvoGM
from evox_merge.problems.landscapes import SmoothLandscape, RuggedLandscape
torch.set_num_threads(1)
CASES = {
    "smooth_n4": dict(landscape=("smooth", 4, 1), algo=dict(num_experts=4, pop_size=6, num_rounds=2, iterations_per_round=2, hidden_sizes=[16, 16], train_steps=5, seed=5)),
    "rugged_n8": dict(landscape=("rugged", 8, 3), algo=dict(num_experts=8, pop_size=16, num_rounds=2, iterations_per_round=1, train_steps=20, seed=7)),
}
out = {"source": "evox_merge/algorithms/evogm.py at git HEAD 13b3276 (paper EvoGM), made by tests/data/make_evogm_paper_reference.py", "cases": {}}
for name, case in CASES.items():
    kind, n, lseed = case["landscape"]
    land = SmoothLandscape(n, seed=lseed) if kind == "smooth" else RuggedLandscape(n, seed=lseed)
    algo = EvoGM(**case["algo"], variant="paper")
    wf = StdWorkflow(algo, land, opt_direction="max")
    wf.init_step()
    for _ in range(algo.generations_per_run - 1):
        wf.step()
    a = wf.algorithm
    out["cases"][name] = {
        "landscape": case["landscape"], "algo": case["algo"],
        "coefficients": a.history.coefficients.tolist(),
        "original_coefficients": a.history.original_coefficients.tolist(),
        "fitness": a.history.fitness.tolist(),
        "round": a.history.round.tolist(), "iteration": a.history.iteration.tolist(),
        "bases": [b.tolist() for b in a.bases], "basis_records": a.basis_records,
        "final_losses": [e["losses"][-1].tolist() for e in a.generator_log],
    }
json.dump(out, open("tests/data/evogm_paper_reference.json", "w"))
