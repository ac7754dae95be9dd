"""recipe.json: everything needed to trust, reproduce and re-make a released merge."""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any, Sequence

from evox.core import Algorithm

from evox_merge.algorithms.common import RecipeFacts
from evox_merge.run.config import SearchConfig
from evox_merge.experts import ExpertSet
from evox_merge.experts.kernel import span_report
from evox_merge.problems.normalisation import TaskNormalisation
from evox_merge.run.selection import tied_with
from evox_merge.tasks import TaskSpec
from evox_merge.tasks.spec import split_overlap
from evox_merge.tasks.chat import chat_facts

OPERATOR = "linear task arithmetic in LoRA factor space: W = W0 + sum_i c_i * s_i * B_i A_i per target layer"
_PACKAGES = ("evox-merge", "evox", "torch", "transformers", "peft", "safetensors", "tokenizers")


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries a merge depends on."""
    versions = {"python": platform.python_version()}
    for package in _PACKAGES:
        try:
            versions[package.replace("-", "_")] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package.replace("-", "_")] = "not installed"
    return versions


def tokenizer_check(experts: ExpertSet) -> dict[str, Any]:
    """What was checked about the tokenizer at load (`ExpertSet.load` refuses any failure, so reaching a recipe
    means every check passed): its size and largest id against the model's embedding rows, and that every expert
    shipping a tokenizer has the same vocabulary."""
    info = dict(experts.tokenizer_info)
    return {
        "tokenizer": info.pop("tokenizer", None),
        "base_vocabulary_size": len(experts.tokenizer),
        "max_token_id": info.pop("max_token_id", None),
        "model_embedding_rows": info.pop("embedding_rows", None),
        "experts_shipping_a_tokenizer": info.pop("experts_shipping_a_tokenizer", []),
        "compatible": bool(experts.tokenizer_info),
        "how": f"every token id below the embedding's row count; the tokenizer fills at least "
               f"{info.pop('min_fill', '?')} of the rows (else it is another model's); experts that ship a "
               "tokenizer have its exact vocabulary; every expert's factors match the base's layer shapes",
    }


def operator(merge_settings: dict[str, Any], name: str, space: Any = None) -> str:
    """How the released merge combines the experts, in words (`space`: the searched candidate's space, if any)."""
    if name in ("ties", "dare"):
        method = "TIES" if name == "ties" else "DARE-TIES"
        return (f"{method} (peft.utils.merge_utils) on the experts' dense task vectors s_i B_i A_i per target layer, "
                f"density {merge_settings.get('density')}, scaling {merge_settings.get('scaling')}")
    if "operator" in merge_settings:  # the merges of evox_merge.problems.static_methods describe themselves
        return str(merge_settings["operator"])
    if name == "mergevolve":
        return ("MERGEvolve: the selected merge's dense delta per target layer, moved by an evolution strategy over "
                "seeded low-rank Gaussian perturbations (recipe.mergevolve)")
    if space is not None and space.kind == "operator":
        return (f"{space.method} (peft.utils.merge_utils) on the experts' dense task vectors s_i B_i A_i per target "
                "layer, its density and per-expert weights searched (release.coefficients_by_name)")
    if space is not None and space.kind == "layer":
        return OPERATOR + ", with c_i per group of layers (release.coefficients_by_name, space.layers)"
    return OPERATOR


def lineage(records: list[dict[str, Any]], release: dict[str, Any], expert_names: list[str]) -> dict[str, Any]:
    """A DAG from the experts (through each round's basis, records that became basis vectors) to the release: a
    searched record, or a static merge made from the experts directly."""
    nodes = [{"id": f"expert:{name}", "kind": "expert"} for name in expert_names]
    edges = []
    bases: dict[int, list[int]] = {}
    for record in records:
        if record.get("round", 0) > 0 and "basis_records" in record:
            bases.setdefault(record["round"], record["basis_records"])
    for round_index, record_ids in sorted(bases.items()):
        previous = bases.get(round_index - 1)
        for position, record_id in enumerate(record_ids):
            node = f"round{round_index}:basis{position}"
            nodes.append({"id": node, "kind": "basis vector", "record": record_id})
            sources = [f"round{round_index - 1}:basis{i}" for i in range(len(previous))] if previous else [
                f"expert:{name}" for name in expert_names
            ]
            edges += [{"from": source, "to": node} for source in sources]
    if release["name"] == "mergevolve":  # evolved from the release it started from: that one's lineage, then it
        start = release["settings"]["start"]
        searched = start.startswith("record:")
        graph = lineage(records, {"name": start, "kind": "searched" if searched else "static",
                                  "settings": {"record": int(start.removeprefix("record:"))} if searched else {}},
                        expert_names)
        origin = graph["nodes"][-1]
        origin["kind"] = "MERGEvolve start"
        graph["nodes"].append({"id": "mergevolve:centre", "kind": "release"})
        graph["edges"].append({"from": origin["id"], "to": "mergevolve:centre"})
        return graph
    parents = [f"expert:{name}" for name in expert_names]
    if release["kind"] == "searched":
        record = next(r for r in records if r["id"] == release["settings"]["record"])
        if record.get("round", 0) in bases:
            parents = [f"round{record['round']}:basis{i}" for i in range(len(bases[record["round"]]))]
    node = f"{'record' if release['kind'] == 'searched' else 'static'}:{release['name'].removeprefix('record:')}"
    nodes.append({"id": node, "kind": "release"})
    edges += [{"from": parent, "to": node} for parent in parents]
    return {"nodes": nodes, "edges": edges}


def build_recipe(
    *,
    config: SearchConfig,
    experts: ExpertSet,
    specs: Sequence[TaskSpec],
    records: list[dict[str, Any]],
    selection: dict[str, Any],
    normalisation: TaskNormalisation,
    adapter_info: dict,
    algorithm: Algorithm,
    resources: dict[str, Any],
    space: Any = None,
    start: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The recipe of a released merge (see the search module for where it is written). ``warnings`` lists inputs
    that were accepted but change what the numbers mean (test examples that are also validation examples:
    `evox_merge.tasks.spec.split_overlap`, counted per task in ``evaluation.test_overlap``). ``search.box`` is the
    box every searched candidate's coefficients lie in; ``search.start`` where the search started (`start`:
    ``{"start": "static" | "default", "starting_points": [{name, search_fitness, coefficients}]}``, from
    `evox_merge.run.search`)."""
    tasks = [{**spec.to_dict(), **spec.file_hashes(), **chat_facts(spec, experts.tokenizer)} for spec in specs]
    overlaps = {spec.name: overlap for spec in specs if (overlap := split_overlap(spec)) is not None}
    best = max((r for r in records if r["fitness"] is not None), key=lambda r: r["fitness"])
    winner = selection["winner"]
    release = winner.to_dict()
    release["coefficients"] = winner.merge.coefficients.tolist() if winner.merge.coefficients is not None else None
    release["chosen_on"] = "selection part" if config.selection_fraction > 0 else "search part (no selection part)"
    release["static_merge_won"] = winner.kind == "static"
    release["selection_margin"] = selection.get("margin")  # evox_merge.run.selection.selection_margin
    release["rule"] = config.release.rule  # evox_merge.run.selection.release_by_rule
    contest_winner = selection.get("contest_winner", winner)
    release["contest_winner"] = contest_winner.name  # the selection contest's winner (before any MERGEvolve stage)
    release["rule_overrode"] = contest_winner.kind == "searched" and winner.kind == "static"
    # candidates whose selection fitness equalled the contest winner's exactly: a tie goes to a static merge
    release["tied_with"] = tied_with(contest_winner, selection.get("candidates", []))
    if winner.merge.dense:  # TIES/DARE or an operator-space candidate: how far outside the experts' span
        release["span_residual"] = span_report(experts.targets, experts.num_experts,
                                               winner.merge.merged_deltas(experts.targets))
    if space is not None and space.kind != "expert" and winner.merge.space is not None:
        release["coefficients_by_name"] = dict(zip(space.names, release["coefficients"]))
    return {
        "name": f"{config.algorithm.name}-seed{config.seed}-{winner.name.replace(':', '')}",
        "base_model": {"path": experts.base_path, "sha256": experts.base_hash,
                       # the transformers class that loads the base and the released full model
                       "auto_class": ("AutoModelForSeq2SeqLM" if experts.model.config.is_encoder_decoder
                                      else "AutoModelForCausalLM"),
                       **({"hub": {"repo_id": experts.base_source.repo_id, "revision": experts.base_source.revision,
                                   "commit": experts.base_source.commit, "snapshot": experts.base_source.path}}
                          if experts.base_source is not None and experts.base_source.repo_id else {})},
        "experts": experts.metadata,
        "tokenizer": tokenizer_check(experts),
        "operator": operator(winner.merge.settings, winner.name, winner.merge.space),
        "release": release,
        "best": {
            "record": best["id"],
            "coefficients": best["coefficients"],
            "coefficients_round_basis": best.get("coefficients_round_basis"),
            "round": best.get("round"),
            "search_fitness": best["fitness"],
        },
        "selection": {
            "selection_fraction": config.selection_fraction,
            "top_k": config.selection_top_k,
            "rule": "the release is the candidate with the best normalised mean on the selection part; searched "
                    "candidates enter by their search-part rank, static merges are tuned on the search part; an exact tie "
                    "goes to a static merge (release.tied_with names the tied candidates)"
                    + ("; a searched winner is released only when its margin over the best static merge is "
                       "distinguishable (release.rule: significant), else that static merge"
                       if config.release.rule == "significant" else ""),
            "candidates": [candidate.to_dict() for candidate in selection["candidates"]],
            "best_searched": selection["best_searched"].name,
        },
        "normalisation": normalisation.to_dict(),
        "space": space.to_dict() if space is not None else {"kind": "expert", "names": experts.expert_names},
        "release_files": {"adapter": None if experts.dense else "best/adapter",
                          "full_model": "best/model" if config.release.full_model or experts.dense else None,
                          "adapter_compression": adapter_info},
        "evaluation": {"tasks": [spec.name for spec in specs], "task_files": tasks, "scores": selection["scores"],
                       "examples": selection.get("examples"),
                       "splits": {"search": "the examples the search scored candidates on",
                                  "selection": "held out from the search; chose the release",
                                  "test": "the tasks' test files, never used to choose anything" if not overlaps else
                                  "the tasks' test files, not fully held out: some test examples are also validation "
                                  "examples (evaluation.test_overlap), which chose the release"},
                       "test_overlap": {name: {key: overlap[key] for key in ("test_examples", "also_in_validation")}
                                        for name, overlap in overlaps.items()}},
        "warnings": [overlap["warning"] for overlap in overlaps.values()],
        "search": {
            "algorithm": config.algorithm.name,
            "algorithm_class": type(algorithm).__name__,
            "config": config.model_dump(mode="json"),
            "evaluations": len(records),
            "seed": config.seed,
            "algorithm_facts": algorithm.recipe_facts() if isinstance(algorithm, RecipeFacts) else {},
            "box": {"lb": config.algorithm.lb, "ub": config.algorithm.ub,
                    "applies_to": "every coordinate of every searched candidate (in the search space's "
                                  "coordinates; EvoGM's after a basis shift too)"},
            **(start or {"start": config.algorithm.start, "starting_points": []}),
        },
        "resources": {**resources, "dtype": experts.dtype_name},  # the dtype the model ran in
        "lineage": lineage(records, release, experts.expert_names),
        "intended_use": config.intended_use,
        "versions": library_versions(),
    }
