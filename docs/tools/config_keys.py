"""One line per search-config key for docs/reference/config.md, where the pydantic field has no ``description``.

The key is its dotted path in a search config (``algorithm.name``; a task spec's fields under ``tasks[].``). A
field's own ``Field(description=...)`` in evox_merge/run/config.py or config_sections.py wins over this table; tests/test_docs.py fails
when a key has neither, or when this table names a key the config no longer has. The wording follows the config
classes' docstrings and the guides; the guides say more (each entry's page is named where one exists).
"""

from __future__ import annotations

DESCRIPTIONS: dict[str, str] = {
    # The models
    "base": "The base model: a local `save_pretrained` folder or a Hub id (`org/name`, `org/name@revision`).",
    "experts": "The experts, at least two: PEFT LoRA adapter folders or full fine-tuned model folders (dense "
               "experts) of the base, or Hub ids; sets may mix both kinds.",
    "tokenizer": "Tokenizer folder or Hub id; default: the base's own. One with more tokens than the model's "
                 "embedding rows is refused.",
    "tasks": "The tasks: a list of task specs (below) or the path to a YAML/JSON file holding that list.",
    # algorithm
    "algorithm": "Which algorithm searches, and its constructor arguments.",
    "algorithm.name": "A name from `evox-merge algorithms` or an import path to any EvoX algorithm "
                      "(`evox.algorithms.DE`).",
    "algorithm.pop_size": "Population size P (EvoGM fixes its own: 2N); checked against the algorithm's smallest "
                          "population.",
    "algorithm.lb": "Lower bound of every coefficient.",
    "algorithm.ub": "Upper bound of every coefficient (above `lb`).",
    "algorithm.start": "`default`: the algorithm's own starting population; `static`: the static merges are "
                       "tuned on the search part before the search, which starts from the linear ones.",
    "algorithm.params": "The algorithm's other constructor arguments (e.g. EvoGM's `num_rounds`, "
                        "`iterations_per_round`), checked against its signature before anything loads.",
    # budget
    "budget": "How long to search: give exactly one of `evaluations` or `generations`.",
    "budget.evaluations": "Candidate evaluations, rounded up to whole generations (the first generation counts).",
    "budget.generations": "Generations, the first (`init_step`) included: 8 at population 20 is 160 evaluations.",
    # scoring
    "seed": "Seed of the search (and of DARE's masks in an operator space), 0 to 2**64 - 1.",
    "device": "Where candidates are scored: `cpu`, `cuda` or `cuda:N`; other torch devices are refused.",
    "dtype": "Dtype the base model is loaded in; `auto`: bfloat16 on a CUDA GPU that supports it, else float32 "
             "(recipe.json holds the dtype used).",
    "batch_size": "Rows per scored batch (candidates per pass multiply it).",
    "max_validation_examples": "At most this many search-part examples per task (default: all of the search "
                               "part).",
    "selection_fraction": "Share of each validation file held out as the selection part, where the release is "
                          "chosen (0: no selection part).",
    "selection_top_k": "How many of the search's best distinct candidates compete with the static merges on the "
                       "selection part.",
    "normalise": "`base_best_single`: per task, 0 = the base model and 1 = the best single expert (on the search "
                 "part) before the weighted mean; `none`: raw scores.",
    "objectives": "`mean` (one fitness, the weighted mean of normalised task scores), `pareto` (one objective per "
                  "task) or a mapping with groups (below).",
    "objectives.kind": "`mean` or `pareto`.",
    "objectives.groups": "Each group is one objective, the weighted mean of its tasks' normalised scores; a task "
                         "in at most one group. Default: one objective per task.",
    "objectives.challengers": "Up to this many releases spread along the front besides the champion and the "
                              "specialists.",
    # output
    "output_dir": "Where the run writes its records, checkpoints and release packet (new, empty, or a previous "
                  "run's with `--resume` / `--overwrite`).",
    "intended_use": "One sentence for the model card and recipe.json.",
    "release": "What the release packet holds besides recipe.json and the merged LoRA adapter.",
    "release.full_model": "Also write the merged full model (`best/model/`).",
    "release.adapter_rank": "Compress the released adapter to this rank with SVD (the error is reported); default: "
                            "exact.",
    "release.baselines": "The static merges compete with the searched candidates on the selection part and are "
                         "reported beside the release.",
    "release.rule": "`best` releases the contest's winner; `significant` releases a searched winner only when its "
                    "selection margin is above resampling noise, else the best static merge.",
    # processes
    "distributed": "Split each population across `torchrun` ranks (also set by `search --distributed`).",
    "collective_timeout_s": "Seconds a rank waits for the others in a collective before the run fails with a "
                            "message naming the generation.",
    # racing
    "racing": "Opt-in racing: score each population in stages and stop scoring candidates that confidently cannot "
              "matter (`evogm`, `cmaes`, `random`; not with PSO, pareto objectives or distributed runs).",
    "racing.confidence": "Confidence of the bound that drops a candidate.",
    "racing.stages": "Fractions of each task's search examples scored per stage, increasing and ending at 1.",
    # space
    "space": "The search space.",
    "space.kind": "`expert` (one coefficient per expert), `layer` (one per expert per group of layers) or "
                  "`operator` (a TIES / DARE merge's density and per-expert weights).",
    "space.by": "Layer space only: `blocks` (contiguous blocks of transformer layers, with `groups`) or `module` "
                "(attention vs MLP).",
    "space.groups": "Layer space with `by: blocks`: the number K of contiguous blocks.",
    "space.method": "Operator space only: `ties`, `dare_linear` or `dare_ties` (default `ties`).",
    # mergevolve
    "mergevolve": "Opt-in last stage: MERGEvolve from the selected release, on the search part; its final centre "
                  "replaces the release only if it scores higher on the selection part.",
    "mergevolve.generations": "Generations of the stage.",
    "mergevolve.pairs": "Antithetic perturbation pairs per generation.",
    "mergevolve.sigma": "Scale of the low-rank Gaussian perturbations.",
    "mergevolve.rank": "Rank of each perturbation.",
    "mergevolve.learning_rate": "Step of the centre along the rank-weighted perturbations.",
    # dense
    "dense": "How full fine-tuned (dense) experts' task vectors are kept.",
    "dense.mode": "`memory` (in RAM, fastest), `stream` (read from the experts' files per candidate) or `svd` "
                  "(compressed once to `rank`).",
    "dense.rank": "Rank of each compressed task vector; needed with `mode: svd`, and only then.",
    "dense.targets": "Regular expressions on parameter names to merge (default: every parameter that differs from "
                     "the base's).",
}
