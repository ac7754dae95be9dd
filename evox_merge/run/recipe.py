"""recipe.json: everything needed to trust, reproduce and re-make a released merge."""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any, Sequence

from evox.core import Algorithm

from evox_merge.algorithms.common import RecipeFacts
from evox_merge.run.config import SearchConfig
from evox_merge.experts import ExpertSet
from evox_merge.tasks import TaskSpec

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
    """What was checked about tokenizers: the base's vocabulary, and every expert that ships one matches it."""
    shipping = [a.path.name for a in experts.adapters if (a.path / "tokenizer_config.json").is_file()]
    return {
        "base_vocabulary_size": len(experts.tokenizer),
        "experts_shipping_a_tokenizer": shipping,
        "compatible": True,
        "how": "experts that ship a tokenizer must have the base's exact vocabulary (checked at load, else refused);"
        " every expert's factors match the base's layer shapes",
    }


def lineage(records: list[dict[str, Any]], best: dict[str, Any], expert_names: list[str]) -> dict[str, Any]:
    """A DAG from the experts through each round's basis (records that became basis vectors) to the best record."""
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
    best_round = best.get("round", 0)
    parents = (
        [f"round{best_round}:basis{i}" for i in range(len(bases[best_round]))]
        if best_round in bases
        else [f"expert:{name}" for name in expert_names]
    )
    nodes.append({"id": f"record:{best['id']}", "kind": "release"})
    edges += [{"from": parent, "to": f"record:{best['id']}"} for parent in parents]
    return {"nodes": nodes, "edges": edges}


def build_recipe(
    *,
    config: SearchConfig,
    experts: ExpertSet,
    specs: Sequence[TaskSpec],
    records: list[dict[str, Any]],
    best: dict[str, Any],
    scores: dict,
    settings: dict,
    adapter_info: dict,
    algorithm: Algorithm,
    resources: dict[str, Any],
) -> dict[str, Any]:
    """The recipe of a released merge (see the search module for where it is written)."""
    tasks = [{**spec.to_dict(), **spec.file_hashes()} for spec in specs]
    basis = [row for row in best.get("coefficients_round_basis", [])] or None
    return {
        "name": f"{config.algorithm.name}-seed{config.seed}-record{best['id']}",
        "base_model": {"path": experts.base_path, "sha256": experts.base_hash},
        "experts": experts.metadata,
        "tokenizer": tokenizer_check(experts),
        "operator": OPERATOR,
        "best": {
            "record": best["id"],
            "coefficients": best["coefficients"],
            "coefficients_round_basis": basis,
            "round": best.get("round"),
            "validation_fitness": best["fitness"],
        },
        "release_files": {"adapter": "best/adapter", "full_model": "best/model" if config.release.full_model else None,
                          "adapter_compression": adapter_info},
        "evaluation": {"tasks": [spec.name for spec in specs], "task_files": tasks, "scores": scores,
                       "baseline_settings": settings},
        "search": {
            "algorithm": config.algorithm.name,
            "algorithm_class": type(algorithm).__name__,
            "config": config.model_dump(mode="json"),
            "evaluations": len(records),
            "seed": config.seed,
            "algorithm_facts": algorithm.recipe_facts() if isinstance(algorithm, RecipeFacts) else {},
        },
        "resources": resources,
        "lineage": lineage(records, best, experts.expert_names),
        "intended_use": config.intended_use,
        "versions": library_versions(),
    }
