"""Every static merge that mergekit 0.1.5 also has, computed by both on the same inputs and compared tensor by tensor.

The inputs are built here: a tiny random Qwen2 base (float32, hidden 32, 2 layers, untied embeddings, the zoo's
character tokenizer) and three dense experts (base plus seeded Gaussian noise: the first changes every parameter,
the second only the MLP and norms, the third only attention and the embedding, so some task vectors are exactly
zero), saved as safetensors folders. For each method, mergekit merges them with ``mergekit-yaml`` on the CPU
(``--random-seed``, no lazy unpickling) and evox-merge merges them through `ExpertSet` and `write_merge` (the
files ``evox-merge apply`` writes); every tensor of the two output folders is compared: the largest absolute
difference and whether every tensor is bit-identical.

Random drops: mergekit seeds torch's global RNG once (``transformers.set_seed(random_seed)``) and draws each
tensor's masks in its order of execution, expert by expert; evox-merge's DARE draws from the global RNG after
``torch.manual_seed(seed)`` and DELLA from a generator seeded with ``seed`` (the same stream on the CPU), target
by target in the model's parameter order, expert by expert. Where both orders agree the masks are the same, which
the comparison shows (a different mask moves entries by the noise scale, not by rounding).

mergekit is an optional dependency: install it in its own environment (it pins its own packages) and name its
``mergekit-yaml``:

    python -m venv /work/mk-venv && /work/mk-venv/bin/pip install torch==2.13.0 mergekit==0.1.5
    python -m benchmarks.mergekit_crosscheck --mergekit-yaml /work/mk-venv/bin/mergekit-yaml
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import yaml
from safetensors.torch import load_file

SEED = 7
SMALL_NOISE = 3e-4  # the experts' noise for the SCE row whose weights fall under mergekit's 1e-6 threshold
RESULTS = Path(__file__).resolve().parent / "results" / "mergekit_crosscheck.md"
CHANGES = (None, r"mlp|norm", r"self_attn|embed_tokens")  # which parameters each expert changes (None: all)


def build_inputs(folder: Path, noise: float = 0.05) -> tuple[Path, list[Path]]:
    """Write the tiny base and three dense experts under `folder`; returns their paths."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from evox_merge.zoo.char_tokenizer import build_char_tokenizer

    torch.manual_seed(SEED)
    tokenizer = build_char_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, torch_dtype="float32")
    model = Qwen2ForCausalLM(config)
    base = folder / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    experts = []
    for index, pattern in enumerate(CHANGES):
        expert = Qwen2ForCausalLM.from_pretrained(base, dtype=torch.float32)
        generator = torch.Generator().manual_seed(SEED * 100 + index)
        with torch.no_grad():
            for name, parameter in expert.named_parameters():
                if pattern is None or re.search(pattern, name):
                    parameter.add_(noise * torch.randn(parameter.shape, generator=generator))
        path = folder / f"expert_{index}"
        expert.save_pretrained(path)
        tokenizer.save_pretrained(path)
        experts.append(path)
    return base, experts


@dataclass
class Case:
    """One comparison: mergekit's config and how evox-merge computes the same merge (`ours(experts)`)."""

    method: str
    ours_name: str
    config: dict
    ours: Callable
    random: bool = False
    notes: str = ""
    cli: bool = False  # a random method through mergekit-yaml anyway
    inputs: tuple | None = None  # (base, experts) other than the main inputs
    result: dict = field(default_factory=dict)


def _models(paths, params=None):
    return [{"model": str(p), **({"parameters": params[i]} if params is not None else {})} for i, p in enumerate(paths)]


def cases(base: Path, experts: list[Path]) -> list[Case]:
    """The methods both tools have, with the settings each side is given (equal formulas where they agree)."""
    from evox_merge.experts.kernel import operator_delta
    from evox_merge.problems import static_methods as sm
    from evox_merge.problems.static_merges import StaticMerge

    def gta(method, params, shared=None):
        return {"merge_method": method, "base_model": str(base), "dtype": "float32", "out_dtype": "float32",
                "models": _models(experts, [params] * len(experts)), **({"parameters": shared} if shared else {})}

    def linear(coefficients):
        return lambda x: StaticMerge("linear", {}, coefficients=torch.tensor(coefficients))

    def deltas(make):
        return lambda x: StaticMerge("deltas", {}, deltas=make(x))

    def peft_operator(method, scaling, density):  # evox-merge's TIES/DARE, as `static_merges.dense_merge` runs it
        def make(x):
            with torch.random.fork_rng():
                torch.manual_seed(SEED)
                weights = torch.full((x.num_experts,), scaling)
                return {n: operator_delta(t, x.num_experts, method, weights, density) for n, t in x.targets.items()}
        return make

    def scaled(make, scaling):
        return lambda x: {n: d * scaling for n, d in make(x).items()}

    d_ties, s_ties, d_dare, s_dare = 0.3, 0.6, 0.6, 0.5
    out = [
        Case("linear", "model_soup", {"merge_method": "linear", "dtype": "float32", "out_dtype": "float32",
                                      "models": _models(experts, [{"weight": 1.0}] * 3)}, linear([1 / 3] * 3),
             notes="weights 1/3 (mergekit: weights 1, normalised)"),
        Case("task_arithmetic", "task_arithmetic", gta("task_arithmetic", {"weight": 0.4}), linear([0.4] * 3),
             notes="scaling 0.4"),
        Case("ties", "ties", gta("ties", {"weight": 1.0, "density": d_ties}, {"lambda": s_ties}),
             deltas(peft_operator("ties", s_ties, d_ties)),
             notes=f"density {d_ties}, scaling {s_ties} (ours: peft's TIES, weights = scaling; mergekit: weight 1, "
                   "lambda = scaling)"),
        Case("dare_linear", "dare_linear (dare's sparsifier)",
             gta("dare_linear", {"weight": s_dare / d_dare, "density": d_dare}, {"rescale": False}),
             deltas(peft_operator("dare_linear", s_dare, d_dare)), random=True,
             notes=f"density {d_dare}, scaling {s_dare}; rescale differs (peft and the DARE paper divide by the "
                   "density, mergekit matches the L1 norm): mergekit runs with rescale false and weight "
                   "scaling/density"),
        Case("dare_ties", "dare",
             gta("dare_ties", {"weight": 1.0, "density": d_dare},
                 {"rescale": False, "normalize": True, "lambda": s_dare / d_dare}),
             deltas(peft_operator("dare_ties", s_dare, d_dare)), random=True,
             notes=f"density {d_dare}, scaling {s_dare}; mergekit with rescale false, normalize true (peft's "
                   "disjoint mean; mergekit's default sums), lambda scaling/density"),
        Case("dare_ties (density 1)", "dare",
             gta("dare_ties", {"weight": 1.0, "density": 1.0}, {"normalize": True, "lambda": s_dare}),
             deltas(peft_operator("dare_ties", s_dare, 1.0)), notes="nothing dropped: the rest of the formula"),
    ]
    for method, linear_form in (("della", False), ("della_linear", True)):
        d, e, s = 0.5, 0.15, 0.8
        out.append(Case(method, method, gta(method, {"weight": 1.0, "density": d, "epsilon": e}, {"lambda": s}),
                        deltas(scaled(lambda x, lf=linear_form, d=d, e=e: sm.della_deltas(
                            x, d, e, SEED, linear=lf, rescale="l1"), s)),
                        random=True, notes=f"density {d}, epsilon {e}, scaling {s}, rescale l1 (mergekit's; our "
                                           "default is the paper's per-entry 1/p)"))
    for method, ties in (("breadcrumbs", False), ("breadcrumbs_ties", True)):
        d, g, s = 0.3, 0.05, 0.7
        out.append(Case(method, method, gta(method, {"weight": 1.0, "density": d, "gamma": g}, {"lambda": s}),
                        deltas(scaled(lambda x, t=ties, d=d, g=g: sm.breadcrumbs_deltas(x, d, g, ties=t), s)),
                        notes=f"density {d}, gamma {g}, scaling {s}"))
    t = 0.3
    out += [
        Case("model_stock", "model_stock", {"merge_method": "model_stock", "base_model": str(base),
                                            "dtype": "float32", "out_dtype": "float32", "models": _models(experts)},
             deltas(sm.model_stock_deltas)),
        Case("slerp", "slerp", {"merge_method": "slerp", "base_model": str(experts[0]), "dtype": "float32",
                                "out_dtype": "float32", "models": _models(experts[:2]), "parameters": {"t": t}},
             deltas(lambda x: sm.slerp_deltas(x, t, pair=(0, 1))), notes=f"experts 0 and 1, t {t}"),
        Case("nuslerp", "nuslerp", {"merge_method": "nuslerp", "base_model": str(base), "dtype": "float32",
                                    "out_dtype": "float32",
                                    "models": _models(experts[:2], [{"weight": 1 - t}, {"weight": t}])},
             deltas(lambda x: sm.nuslerp_deltas(x, t, pair=(0, 1))), notes=f"experts 0 and 1, t {t}"),
        Case("multislerp", "multislerp", {"merge_method": "multislerp", "base_model": str(base),
                                          "dtype": "float32", "out_dtype": "float32",
                                          "models": _models(experts, [{"weight": 1.0}] * 3)},
             deltas(sm.multislerp_deltas), notes="equal weights"),
        Case("sce", "sce", {"merge_method": "sce", "base_model": str(base), "dtype": "float32",
                            "out_dtype": "float32", "models": _models(experts), "parameters": {"select_topk": 0.4}},
             deltas(lambda x: sm.sce_deltas(x, 0.4)), notes="select_topk 0.4"),
    ]
    return out


# Run by mergekit's own Python: its public in-memory API (`merge_state_dicts`) over the tensors in a given order,
# after `torch.manual_seed`, so that its masks are drawn in the order evox-merge draws them.
API_MERGE = r"""
import json, sys, torch
from safetensors.torch import load_file, save_file
from mergekit.merge_methods.api import merge_state_dicts
spec = json.load(open(sys.argv[1]))
def state(folder):
    out = {}
    for file in sorted(__import__("pathlib").Path(folder).glob("*.safetensors")):
        out.update(load_file(file))
    return {name: out[name] for name in spec["order"]}
models = {"base": state(spec["base"]), **{f"expert_{i}": state(p) for i, p in enumerate(spec["experts"])}}
torch.manual_seed(spec["seed"])
merged = merge_state_dicts(models, spec["method"], parameters=spec["parameters"], base="base", dtype=torch.float32)
save_file({name: tensor.contiguous() for name, tensor in merged.items()}, spec["out"])
"""


def mergekit_api(python: str, case: Case, base: Path, experts: list[Path], order: list[str], out: Path) -> str:
    """Merge `case` with mergekit's `merge_state_dicts` (tensors in `order`, global seed `SEED`) into the folder
    `out`; returns mergekit's error text, or "" on success."""
    parameters = {**case.config["models"][0].get("parameters", {}), **case.config.get("parameters", {})}
    out.mkdir(parents=True)
    spec = out.parent / "api.json"
    spec.write_text(json.dumps({"base": str(base), "experts": [str(p) for p in experts], "order": order,
                                "seed": SEED, "method": case.config["merge_method"], "parameters": parameters,
                                "out": str(out / "model.safetensors")}))
    done = subprocess.run([python, "-c", API_MERGE, str(spec)], capture_output=True, text=True)
    return "" if done.returncode == 0 else "\n".join(done.stderr.strip().splitlines()[-2:])


def _state(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict:
    """Max absolute difference over every tensor, whether all are bit-identical, and how many differ at all."""
    if set(ours) != set(theirs):
        return {"error": f"tensor names differ: only ours {sorted(set(ours) - set(theirs))}, only mergekit's "
                         f"{sorted(set(theirs) - set(ours))}"}
    diffs = {k: float((ours[k].double() - theirs[k].double()).abs().max()) for k in ours}
    return {"max_abs_diff": max(diffs.values()), "identical": all(torch.equal(ours[k], theirs[k]) for k in ours),
            "tensors": len(ours), "tensors_differing": sum(d > 0 for d in diffs.values()),
            "max_abs_weight": max(float(t.abs().max()) for t in theirs.values())}


def run(mergekit_yaml: str, work: Path) -> tuple[list[Case], str]:
    """Build the inputs, run every case through mergekit and evox-merge, compare; returns the cases and mergekit's
    version."""
    from evox_merge.experts import ExpertSet
    from evox_merge.run.release import write_merge

    python = str(Path(mergekit_yaml).parent / "python")  # the interpreter of mergekit's environment
    version = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                             capture_output=True, text=True).stdout.strip() or "unknown"
    base, experts = build_inputs(work / "inputs")
    results = cases(base, experts)
    cli_della = next(c for c in cases(base, experts) if c.method == "della")
    cli_della.method, cli_della.cli = "della (mergekit-yaml)", True
    cli_della.notes = ("the same merge through mergekit-yaml --random-seed: its scheduler draws the masks in its own "
                       "order of tensors, so they differ from any fixed order's (hence the API above)")
    results.insert(results.index(next(c for c in results if c.method == "della_linear")), cli_della)
    small_base, small_experts = build_inputs(work / "inputs_small", noise=SMALL_NOISE)
    small_sce = next(c for c in cases(small_base, small_experts) if c.method == "sce")
    small_sce.method, small_sce.inputs = f"sce (experts' noise std {SMALL_NOISE:g})", (small_base, small_experts)
    small_sce.notes = ("select_topk 0.4; mean squared task-vector entries sum below 1e-6 here: mergekit then weighs "
                       "the experts equally, ours by their squares (SCE's formula)")
    results.append(small_sce)
    sets: dict = {}
    for case in results:
        case_base, case_experts = case.inputs or (base, experts)
        count = 2 if case.method in ("slerp", "nuslerp") else 3  # slerp: its own two-expert set
        key = (str(case_base), count)
        if key not in sets:
            sets[key] = ExpertSet.load(case_base, case_experts[:count])
        expert_set = sets[key]
        folder = work / re.sub(r"\W+", "_", case.method).strip("_")
        config = folder / "config.yml"
        folder.mkdir(parents=True)
        config.write_text(yaml.safe_dump(case.config, sort_keys=False))
        if case.random and not case.cli:  # masks drawn in evox-merge's order: mergekit's API, tensors in order
            error = mergekit_api(python, case, case_base, case_experts, expert_set.target_names, folder / "mergekit")
        else:
            done = subprocess.run([mergekit_yaml, str(config), str(folder / "mergekit"), "--random-seed",
                                   str(SEED), "--no-lazy-unpickle", "--no-cuda", "--no-copy-tokenizer", "--quiet",
                                   "--no-write-model-card"], capture_output=True, text=True)
            error = "" if done.returncode == 0 else "\n".join(done.stderr.strip().splitlines()[-2:])
        if error:
            case.result = {"error": f"mergekit failed: {error}"}
            continue
        write_merge(expert_set, case.ours(expert_set), folder / "ours", written_by="mergekit_crosscheck")
        case.result = compare(_state(folder / "ours" / "model"), _state(folder / "mergekit"))
        case.result["how"] = "mergekit-yaml" if case.cli or not case.random else "merge_state_dicts"
    return results, version


def report(results: list[Case], version: str) -> str:
    """The markdown table of benchmarks/results/mergekit_crosscheck.md."""
    from evox_merge.util.machine import machine_markdown

    lines = [
        "# Static merges: evox-merge against mergekit",
        "",
        f"mergekit {version} and evox-merge merge the same tiny inputs (a random Qwen2 base, hidden 32, 2 layers, "
        "float32, and three dense experts: base plus Gaussian noise of std 0.05, the second changing only the MLP "
        "and norms, the third only attention and the embedding, so some task vectors are exactly 0); every tensor "
        "of the two merged models (27) is compared: evox-merge's through `write_merge`, the files `evox-merge apply` "
        "writes. Weights are up to about "
        f"{max(c.result.get('max_abs_weight', 0) for c in results):.2f}, so a difference of ~1e-7 is float32 "
        "rounding and one of ~0.1 a different formula or mask. Command: `python -m benchmarks.mergekit_crosscheck "
        f"--mergekit-yaml /work/mk-venv/bin/mergekit-yaml` (seed {SEED}; mergekit 0.1.5 in its own venv with "
        "torch 2.13.0 CPU, like evox-merge's).",
        "",
        "Random drops: mergekit's `--random-seed` calls `transformers.set_seed` once before the merge (torch's "
        "global RNG), and each tensor's masks are drawn in its scheduler's order of tensors. So the random methods "
        "run through mergekit's own Python API instead (`mergekit.merge_methods.api.merge_state_dicts`, the tensors "
        "in the model's parameter order, after `torch.manual_seed`), which draws them in evox-merge's order; the "
        "`della (mergekit-yaml)` row shows the same merge through the command line.",
        "",
        "Not bit-identical by construction (same formula, another order of float operations): linear / task "
        "arithmetic (mergekit sums whole weights or task vectors then adds them; evox-merge adds c_i tau_i to W0 one "
        "by one), TIES and DARE (evox-merge's come from peft: the scaling is a weight inside the sum; mergekit "
        "multiplies the mean by lambda), Model Stock (mergekit mixes whole weights t w_avg + (1 - t) w_0; evox-merge "
        "adds t mean(tau) to W0), SLERP (of whole weights, then minus W0 and plus W0 again).",
        "",
        "| method (mergekit) | ours | mergekit run by | max abs diff | bit-identical | tensors differing | notes |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case in results:
        r = case.result
        if "error" in r:
            lines.append(f"| {case.method} | {case.ours_name} | n/a | n/a | n/a | n/a | {r['error']} |")
            continue
        lines.append(f"| {case.method} | {case.ours_name} | {r['how']} | {r['max_abs_diff']:.3g} | "
                     f"{'yes' if r['identical'] else 'no'} | {r['tensors_differing']}/{r['tensors']} | "
                     f"{case.notes} |")
    lines += ["", "Not compared: RankMean (mergekit has no such method); evox-merge's DELLA default rescales each "
              "kept entry by 1 / its keep probability (the DELLA paper and its authors' code), where mergekit "
              "rescales the whole tensor to its L1 norm: the rows above run ours with `rescale=\"l1\"` to compare "
              "the rest; DARE's rescale likewise (peft: 1 / density, mergekit: L1 norm)."]
    lines += ["", "Machine:", "", machine_markdown()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mergekit-yaml", default=shutil.which("mergekit-yaml"),
                        help="mergekit's mergekit-yaml (its own environment)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--work", help="keep the inputs and merged models here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if not args.mergekit_yaml or not Path(args.mergekit_yaml).exists():
        sys.exit("mergekit-yaml not found: install mergekit 0.1.5 in its own environment and pass --mergekit-yaml")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        results, version = run(args.mergekit_yaml, Path(args.work) if args.work else Path(tmp))
    text = report(results, version)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
