"""Error-table cases: former tracebacks and late refusals (run by tests/test_errors.py; see tests/error_harness.py).

Each was a traceback, or a refusal that came only after the model loaded; each is now refused before the model
loads. Algorithm settings are checked from the config by the rules of `evox_merge.algorithms.limits` (no import of
torch or EvoX), the validation file's split from its examples, an expert identical to the base from its files.
tests/test_fast_refusals.py checks that the config-only ones import nothing heavy.
"""

from __future__ import annotations

import json
import shutil

from safetensors.torch import load_file

from error_harness import Case, Workspace, cli, dense_expert, search
from evox_merge.util.errors import EvoxMergeError, MergeInputError, ZooError

INVALID = r"invalid search config: "


def _one_example(ws: Workspace) -> None:
    path = ws.root / "data" / "copy_validation.jsonl"
    path.write_text(path.read_text().splitlines()[0] + "\n")
    search(ws)


def _untrained_lora(ws: Workspace) -> None:
    def zero_b(tensors: dict) -> None:
        for key in tensors:
            if "lora_B" in key:
                tensors[key].zero_()
    ws.edit_tensors("expert_1", zero_b)
    search(ws)


def _dense_copy_of_base(ws: Workspace) -> None:
    shutil.copytree(ws.root / "base", ws.root / "dense_0")
    search(ws, experts=["expert_0", "dense_0"])


def _dense_targets_unchanged(ws: Workspace) -> None:
    base = load_file(ws.root / "base" / "model.safetensors")

    def mlp_only(tensors: dict) -> None:  # a fine-tune of the MLP weights alone
        for key in tensors:
            if ".mlp." not in key:
                tensors[key] = base[key]
    search(ws, experts=["expert_0", dense_expert(ws, edit=mlp_only)], dense={"targets": ["self_attn"]})


def _zoo_dir_of_other_files(ws: Workspace) -> None:
    (ws.root / "notes").mkdir()
    (ws.root / "notes" / "todo.txt").write_text("the user's own file")
    cli("search", "--zoo", "--preset", "micro", "--zoo-dir", ws.root / "notes", "--quiet")


CASES: list[Case] = [
    # Tracebacks in the wrapped EvoX classes, now refused from the config (no import).
    Case("cmaes_pop_size_1", "`algorithm: {name: cmaes, pop_size: 1}`",
         lambda ws: search(ws, algorithm={"name": "cmaes", "pop_size": 1}), MergeInputError,
         INVALID + r"algorithm\.pop_size: cmaes needs at least 2 \(its pop_size // 2 best candidates move the mean\), "
         r"got 1"),
    Case("nsga2_pop_size_1", "`algorithm: {name: nsga2, pop_size: 1}` with `objectives: pareto`",
         lambda ws: search(ws, algorithm={"name": "nsga2", "pop_size": 1}, objectives="pareto"), MergeInputError,
         INVALID + r"algorithm\.pop_size: nsga2 needs at least 2 \(crossover mates candidates in pairs\), got 1"),
    Case("evogm_pop_size_1", "`algorithm: {name: evogm, pop_size: 1}` (refused only after the model loaded)",
         lambda ws: search(ws, algorithm={"name": "evogm", "pop_size": 1}), MergeInputError,
         INVALID + r"algorithm\.pop_size: evogm needs at least 2 \(a round's history splits into winners and losers\)"),
    Case("moead_too_few_weight_vectors", "`algorithm: {name: moead, pop_size: 12}` for three objectives",
         lambda ws: search(ws, algorithm={"name": "moead", "pop_size": 12}, objectives="pareto"), MergeInputError,
         INVALID + r"algorithm\.pop_size: MOEA/D turns pop_size 12 into 10 weight vectors for 3 objectives and needs "
         r"at least 11"),
    Case("evogm_basis_layer_space", "EvoGM with `pop_size: 2`, one iteration per round, in a 6-dimensional layer "
         "space (a basis shift needs 6 vectors)",
         lambda ws: search(ws, algorithm={"name": "evogm", "pop_size": 2, "params": {"iterations_per_round": 1}},
                           space={"kind": "layer", "groups": 2}), MergeInputError,
         INVALID + r"algorithm\.pop_size: expected pop_size \* \(iterations_per_round \+ 1\) >= num_experts = 6 so a "
         r"basis shift finds N vectors, got 2 \(layer space\)"),
    Case("evogm_params_out_of_range", "`algorithm.params: {num_rounds: 0, winner_ratio: 2}` for EvoGM",
         lambda ws: search(ws, algorithm={"name": "evogm", "params": {"num_rounds": 0, "winner_ratio": 2}}),
         MergeInputError, INVALID + r"algorithm\.params\.num_rounds: expected an integer >= 1, got 0; "
         r"algorithm\.params\.winner_ratio: expected a float in \(0, 1\), got 2"),
    Case("seed_too_large", "`seed: 18446744073709551616` (2**64)", lambda ws: search(ws, seed=2 ** 64),
         MergeInputError, INVALID + r"seed: expected an integer from 0 to 2\*\*64 - 1 \(18446744073709551615\), the "
         r"range of a torch generator's seed; got 18446744073709551616"),
    Case("seed_negative", "`seed: -1`", lambda ws: search(ws, seed=-1), MergeInputError,
         INVALID + r"seed: expected an integer from 0 to 2\*\*64 - 1 .*got -1"),
    Case("device_mps", "`device: mps`", lambda ws: search(ws, device="mps"), MergeInputError,
         INVALID + r"device: 'mps' is not a device evox-merge runs on; expected 'cpu', or 'cuda' / 'cuda:N'"),
    Case("device_meta", "`device: meta`", lambda ws: search(ws, device="meta"), MergeInputError,
         INVALID + r"device: 'meta' is not a device evox-merge runs on"),
    Case("algorithm_params_device", "`algorithm.params: {device: cuda}` (the config's `device` decides)",
         lambda ws: search(ws, algorithm={"name": "cmaes", "params": {"device": "cuda"}}), MergeInputError,
         INVALID + r"algorithm\.params\.device: set by the search itself .*use the algorithm's own config key "
         r"\(device\)"),
    Case("cmaes_sigma_negative", "`algorithm: {name: cmaes, params: {sigma: -0.5}}`",
         lambda ws: search(ws, algorithm={"name": "cmaes", "params": {"sigma": -0.5}}), MergeInputError,
         INVALID + r"algorithm\.params\.sigma: expected a number > 0 \(or null for the default\), got -0\.5"),
    Case("cmaes_mean_init_length", "`mean_init` of 2 numbers for 3 experts",
         lambda ws: search(ws, algorithm={"name": "cmaes", "params": {"mean_init": [0.1, 0.2]}}), MergeInputError,
         INVALID + r"algorithm\.params\.mean_init: expected 3 numbers \(one per dimension of the expert space\), "
         r"got 2"),
    Case("pso_init_unknown", "`algorithm: {name: pso, params: {init: gaussian}}` (taken as uniform before)",
         lambda ws: search(ws, algorithm={"name": "pso", "params": {"init": "gaussian"}}), MergeInputError,
         INVALID + r"algorithm\.params\.init: expected 'hybrid' or 'uniform', got 'gaussian'"),
    Case("pso_merging_density_zero", "`algorithm: {name: pso_merging, params: {density: 0}}` (sparsified experts "
         "that are the base)",
         lambda ws: search(ws, algorithm={"name": "pso_merging", "params": {"density": 0}}), MergeInputError,
         INVALID + r"algorithm\.params\.density: expected a float in \(0, 1\], got 0"),
    Case("model_swarms_no_pull", "`algorithm: {name: model_swarms}` with inertia, cognitive, social and repel all 0 "
         "(a velocity of 0 / 0)",
         lambda ws: search(ws, algorithm={"name": "model_swarms", "params": {"inertia": 0, "cognitive": 0,
                                                                             "social": 0, "repel": 0}}),
         MergeInputError, INVALID + r"algorithm\.params\.repel: expected at least one of inertia, cognitive, "
         r"social, repel > 0 \(the velocity is their weighted mean\), got all 0"),
    Case("ub_infinite", "`algorithm.ub: .inf` (every candidate was NaN after the model loaded)",
         lambda ws: search(ws, algorithm={"name": "random", "ub": float("inf")}), MergeInputError,
         INVALID + r"algorithm\.ub: .*expected a finite number, got inf"),
    Case("lb_nan", "`algorithm.lb: .nan`", lambda ws: search(ws, algorithm={"name": "random", "lb": float("nan")}),
         MergeInputError, INVALID + r"algorithm\.lb: .*expected a finite number, got nan"),
    Case("import_path_constructor_assert", "`algorithm: {name: evox.algorithms.DE, pop_size: 3}` (an assert in "
         "EvoX's constructor, a traceback after the model loaded)",
         lambda ws: search(ws, algorithm={"name": "evox.algorithms.DE", "pop_size": 3}), MergeInputError,
         INVALID + r"algorithm\.params: cannot build evox\.algorithms\.DE with \['lb', 'pop_size', 'ub'\]: "
         r"AssertionError in its constructor \(an argument outside its valid range"),
    Case("subsample_with_racing", "`subsample: {size: 4}` with `racing: {}`",
         lambda ws: search(ws, subsample={"size": 4}, racing={}), MergeInputError,
         INVALID + r".*subsample: not with racing \(both choose which examples a candidate is scored on\)"),
    Case("subsample_multi_objective", "`subsample: {size: 4}` with `algorithm: {name: nsga2}`, `objectives: pareto`",
         lambda ws: search(ws, subsample={"size": 4}, algorithm={"name": "nsga2", "pop_size": 4},
                           objectives="pareto"), MergeInputError,
         INVALID + r".*subsample: algorithm 'nsga2' keeps fitness that the subsample mode cannot keep paired"),
    Case("subsample_size_fraction_out_of_range", "`subsample: {size: 1.5}`",
         lambda ws: search(ws, subsample={"size": 1.5}), MergeInputError,
         INVALID + r".*subsample\.size: .*a fraction of each task's search part must lie in \(0, 1\), got 1\.5"),
    Case("racing_import_path_algorithm", "`racing: {}` with `algorithm.name: evox.algorithms.DE`",
         lambda ws: search(ws, algorithm={"name": "evox.algorithms.DE", "pop_size": 8}, racing={}), MergeInputError,
         INVALID + r"racing: DE does not say which candidates it uses \(no racing_threshold\(\)\)"),
    # Refusals that came after the model loaded, now before it.
    Case("validation_one_example", "a validation file with one example (too few to split)", _one_example,
         MergeInputError, INVALID + r"tasks\.copy\.path: task 'copy': .*copy_validation\.jsonl holds 1 example\(s\); "
         r"a search part and a selection part need at least 2 \(or set selection_fraction: 0\)"),
    Case("prompt_empty", "a generation example whose prompt is empty (was 'example 8' after the model loaded)",
         lambda ws: (ws.line("copy", json.dumps({"prompt": "", "answer": "x"})), search(ws)), MergeInputError,
         INVALID + r"tasks\.copy\.path: .*copy_validation\.jsonl:13: the prompt is empty \(prefix \+ prompt_template "
         r"'\{prompt\}' give ''\)"),
    Case("prompt_empty_choice", "a multiple-choice example whose prompt is empty (was 'row 0' after the model "
         "loaded, with a run.json, records.jsonl and checkpoint left behind)",
         lambda ws: (ws.line("choice", json.dumps({"prompt": "", "choices": ["a", "b"], "answer": 0})), search(ws)),
         MergeInputError, r"tasks\.choice\.path: .*choice_validation\.jsonl:13: the prompt is empty"),
    Case("expert_untrained_lora", "an expert whose every `lora_B` is zero (the base itself; searched without a "
         "word before)", _untrained_lora, MergeInputError,
         r"expert_1/adapter_model\.safetensors: every module's lora_B \(or lora_A\) is all zeros, so this expert "
         r"leaves the base unchanged"),
    Case("expert_dense_copy_of_base", "a dense expert that is a copy of the base", _dense_copy_of_base,
         MergeInputError, r"dense_0: no parameter differs from the base's \(the base itself, or a copy of it\?\)"),
    Case("expert_dense_unchanged_targets", "a dense expert that changes only MLP weights, with "
         "`dense: {targets: [self_attn]}`", _dense_targets_unchanged, MergeInputError,
         r"dense_0: no parameter differs from the base's among dense\.targets"),
    Case("dense_targets_match_nothing", "`dense: {targets: [nowhere]}` with a dense expert",
         lambda ws: search(ws, experts=["expert_0", dense_expert(ws)], dense={"targets": ["nowhere"]}),
         MergeInputError, r"dense\.targets: pattern 'nowhere' matches no parameter of the base"),
    # search --zoo and the flags around a config: refused before the zoo is built or torch imported.
    Case("zoo_preset_unknown", "`search --zoo --preset huge`",
         lambda ws: cli("search", "--zoo", "--preset", "huge", "--zoo-dir", ws.root / "zoo", "--quiet"), ZooError,
         r"--preset: unknown zoo preset 'huge'; expected one of \['micro', 'small', 'tiny'"),
    Case("zoo_dir_is_file", "`search --zoo --zoo-dir` a file",
         lambda ws: cli("search", "--zoo", "--preset", "micro", "--zoo-dir", ws.root / "data" / "copy_test.jsonl"),
         ZooError, r"--zoo-dir: .*copy_test\.jsonl is a file; expected a zoo directory"),
    Case("zoo_dir_of_other_files", "`search --zoo --zoo-dir` a folder of the user's own files",
         _zoo_dir_of_other_files, ZooError, r"notes is not empty and holds no zoo that evox-merge built"),
    Case("zoo_seed_negative", "`search --zoo --seed -1`",
         lambda ws: cli("search", "--zoo", "--preset", "micro", "--seed", "-1", "--zoo-dir", ws.root / "zoo"),
         MergeInputError, r"--seed: expected an integer from 0 to 2\*\*64 - 1"),
    Case("search_zoo_out_is_file", "`search --zoo --out` a file (refused after the zoo was built before)",
         lambda ws: cli("search", "--zoo", "--preset", "micro", "--zoo-dir", ws.root / "zoo", "--out",
                        ws.write_config()), EvoxMergeError, r"--out: .*search\.yaml is a file; expected a directory"),
    Case("search_seed_with_config", "`search CONFIG --seed 3` (ignored before: the config's seed was used)",
         lambda ws: cli("search", ws.write_config(), "--seed", "3"), EvoxMergeError,
         r"--seed: only with --zoo \(a CONFIG file sets its own seed\)"),
]
