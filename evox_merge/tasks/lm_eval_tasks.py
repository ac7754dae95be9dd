"""lm-evaluation-harness tasks as a task source: a spec naming a harness task is built by the harness's own task
machinery into our JSONL records, then scored by our batched scorers with the harness's metrics.

A spec such as ``{lm_eval: arc_easy, limit: 200, num_fewshot: 5}`` loads the task through the harness's
``TaskManager`` (``include_path``: a folder of extra task YAMLs), sets ``num_fewshot`` and the few-shot seed as
``lm_eval.simple_evaluate`` does, and turns each document into the request the harness would send (its
``fewshot_context`` and ``construct_requests``: prompt templates, few-shot sampling, ``doc_to_choice``, target
delimiter, stop sequences):

* ``multiple_choice`` -> our multiple choice (context, each ``target_delimiter + choice``; trailing whitespace of the
  context moved into the choices, as the harness's HF model does), scored by the harness's ``process_results`` on
  our log-likelihoods (``acc`` or ``acc_norm``);
* ``loglikelihood_rolling`` -> our language modelling, each text scored after the harness's prefix token (BOS, else
  EOS; `evox_merge.tasks.chat.context_ids`); the fitness is minus the mean NLL per token, and
  `rolling_metrics` gives the harness's word/byte perplexity from the same log-likelihoods;
* ``generate_until`` -> our greedy generation (``until`` as stop strings, ``max_gen_toks``), scored by the
  harness's filter pipeline (``filter``: its name, default the first) and ``process_results`` (``exact_match``).

With ``apply_chat_template: true`` (multiple choice and ``generate_until``), the harness builds the conversation as
``simple_evaluate(apply_chat_template=True)`` does (``fewshot_as_multiturn``, default true as there; a
``system_instruction``): each record keeps the harness's messages (``chat``), rendered by the scored model's
tokenizer (`evox_merge.tasks.chat.prompt_ids`) as the harness's HF model renders them.

Search and selection use the harness's validation split, test its test split; a task with one of them only uses it
for search and selection and has no test split (``lm_eval.splits`` in the spec and recipe.json says which). The
records are written under `cache_root` (``$EVOX_MERGE_LM_EVAL_CACHE``, default ``~/.cache/evox-merge/lm_eval``),
one folder per task, version and options; nothing there is deleted. Datasets come only from a local path or the
datasets cache (``HF_DATASETS_OFFLINE`` is set): a missing one is a `TaskFormatError` naming the task and the cache.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from evox_merge.tasks.chat import chat_option
from evox_merge.tasks.spec import TaskSpec
from evox_merge.util.atomic import write_text_atomic
from evox_merge.util.errors import TaskFormatError

OPTIONS = {"lm_eval", "name", "limit", "num_fewshot", "fewshot_seed", "include_path", "metric", "filter", "weight",
           "chat_template", "system_prompt", "apply_chat_template", "fewshot_as_multiturn", "system_instruction"}
CHAT_MARK = "\x00evox-merge chat\x00"  # what the capturing chat template returns, then the messages as JSON
FEWSHOT_SEED = 1234  # lm_eval.simple_evaluate's default fewshot_random_seed
# harness output type -> (our task type, the harness metrics we score, our metric name per harness metric)
TYPES = {
    "multiple_choice": ("multiple_choice", {"acc": "accuracy", "acc_norm": "accuracy_norm"}),
    "generate_until": ("generation", {"exact_match": "exact_match"}),
    "loglikelihood_rolling": ("language_modeling", {}),
}


def cache_root() -> Path:
    """Where built harness tasks are written: ``$EVOX_MERGE_LM_EVAL_CACHE``, else ``lm_eval/`` in the cache root the
    zoo uses (``$EVOX_MERGE_CACHE``, default ``$XDG_CACHE_HOME/evox-merge``, i.e. ``~/.cache/evox-merge``)."""
    if os.environ.get("EVOX_MERGE_LM_EVAL_CACHE"):
        return Path(os.environ["EVOX_MERGE_LM_EVAL_CACHE"]).expanduser().absolute()
    root = os.environ.get("EVOX_MERGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "evox-merge")
    return Path(root, "lm_eval").expanduser().absolute()


def harness_version() -> str:
    """The installed lm-evaluation-harness version; a `TaskFormatError` naming the extra when it is missing."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("lm_eval")
    except PackageNotFoundError:
        raise TaskFormatError("lm-evaluation-harness is not installed; pip install 'evox-merge[lm-eval]'") from None


def _offline() -> None:
    """Datasets only from a local path or the cache: no download, ever."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets

    datasets.config.HF_DATASETS_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True


@lru_cache(maxsize=8)
def _manager(include_path: str | None):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def _load(name: str, include_path: str | None) -> dict:
    """``TaskManager.load([name])``: the task (or a group's tasks) with its dataset, offline.

    Raises:
        TaskFormatError: the harness is missing, the name is unknown, or a dataset is not local.
    """
    harness_version()
    _offline()
    manager = _manager(include_path)
    where = f"lm_eval task {name!r}"
    if name not in manager.all_tasks:
        close = difflib.get_close_matches(name, manager.all_tasks, n=3)
        raise TaskFormatError(f"{where}: no such harness task" + (f" (did you mean {close}?)" if close else "") +
                              (f"; the include_path {include_path} adds its YAMLs" if include_path else
                               "; a local task needs 'include_path', the folder of its YAML"))
    try:
        return manager.load([name])
    except Exception as error:  # the harness's and datasets' own errors, all reported the same way
        import datasets

        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise TaskFormatError(f"{where}: its dataset could not be loaded from a local path or the datasets cache "
                              f"{datasets.config.HF_DATASETS_CACHE} (downloads are off: HF_DATASETS_OFFLINE=1): "
                              f"{type(error).__name__}: {first}") from None


@lru_cache(maxsize=32)
def group_members(name: str, include_path: str | None) -> tuple[str, ...] | None:
    """The task names of a harness group (its subgroups' tasks too), sorted; None when `name` is one task."""
    loaded = _load(name, include_path)
    if not loaded["groups"] and len(loaded["tasks"]) == 1:
        return None
    return tuple(sorted(loaded["tasks"]))


@lru_cache(maxsize=32)
def harness_task(name: str, include_path: str | None, num_fewshot: int | None):
    """The harness's task object, built by its ``TaskManager`` with ``num_fewshot`` set as ``simple_evaluate``
    sets it (memoised per process: scorers and splits share one).

    Raises:
        TaskFormatError: the harness is missing, the task is unknown or a group, or its dataset is not local.
    """
    loaded = _load(name, include_path)
    if loaded["groups"] or len(loaded["tasks"]) != 1:
        raise TaskFormatError(f"lm_eval task {name!r} is a group of {sorted(loaded['tasks'])}: build it with "
                              "harness_specs")
    task = next(iter(loaded["tasks"].values()))
    if num_fewshot is not None and task.get_config("num_fewshot") != 0:
        task.set_config(key="num_fewshot", value=num_fewshot)
    elif task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    return task


def config_sha256(task) -> str:
    """SHA-256 of the harness task's config (``dump_config``, keys sorted, callables by name)."""
    text = json.dumps(task.dump_config(), sort_keys=True, default=lambda value: getattr(value, "__name__", str(value)))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_docs(task, split: str) -> list:
    """The harness task's documents of one split (``validation`` or ``test``)."""
    return list(task.validation_docs() if split == "validation" else task.test_docs())


def _splits(task, where: str) -> dict[str, str | None]:
    """Which harness split serves as our validation file (search, selection) and which as test."""
    has_validation, has_test = task.has_validation_docs(), task.has_test_docs()
    if has_validation:
        return {"validation": "validation", "test": "test" if has_test else None}
    if has_test:
        return {"validation": "test", "test": None}
    raise TaskFormatError(f"{where}: the harness task has neither a validation nor a test split")


def _int_option(data: dict, key: str, least: int, where: str) -> int | None:
    value = data.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
        raise TaskFormatError(f"{where}: '{key}' must be an integer >= {least}, got {value!r}")
    return value


def harness_specs(data: dict[str, Any], base_dir: str | Path | None = None, where: str = "task") -> list[TaskSpec]:
    """The specs of a harness task (one) or group (one per task of the group, its subgroups' too): each member
    built by `harness_spec` with the spec's options, named after the harness task, with an equal share of the
    spec's ``weight`` (the group counts as one task in the fitness) and the group's name in ``lm_eval.group``.
    A ``name`` applies to a single task only."""
    include = _include_path(data, base_dir, f"{where} (lm_eval task {data['lm_eval']!r})")
    members = group_members(data["lm_eval"], include)
    if members is None:
        return [harness_spec(data, base_dir, where)]
    group = data["lm_eval"]
    if "name" in data:
        raise TaskFormatError(f"{where} (lm_eval group {group!r}): 'name' names one task; a group's tasks keep "
                              f"their harness names {list(members)}")
    weight = data.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise TaskFormatError(f"{where} (lm_eval group {group!r}): 'weight' must be a number, got {weight!r}")
    return [harness_spec({**data, "lm_eval": member, "weight": weight / len(members)}, base_dir,
                         f"{where} (group {group!r})", group=group) for member in members]


def _include_path(data: dict[str, Any], base_dir: str | Path | None, where: str) -> str | None:
    """The spec's ``include_path`` as an absolute folder, or None."""
    include = data.get("include_path")
    if include is None:
        return None
    if not isinstance(include, str):
        raise TaskFormatError(f"{where}: 'include_path' must be a folder path, got {include!r}")
    include = str(Path(base_dir or ".", include).expanduser().absolute())
    if not Path(include).is_dir():
        raise TaskFormatError(f"{where}: include_path {include} is not a folder of task YAMLs")
    return include


def harness_spec(data: dict[str, Any], base_dir: str | Path | None = None, where: str = "task",
                 group: str | None = None) -> TaskSpec:
    """Build a harness task named by ``data["lm_eval"]`` into JSONL files and return its `TaskSpec`.

    Keys: ``lm_eval`` (the harness task), ``name`` (default: the harness task), ``limit`` (the first examples of
    each split), ``num_fewshot``, ``fewshot_seed`` (default 1234, as ``simple_evaluate``), ``include_path`` (a folder of
    task YAMLs), ``metric`` (``acc``/``acc_norm``, ``exact_match``; default the task's first of those), ``filter``
    (generation: the harness filter pipeline, default its first), ``weight``, ``chat_template``/``system_prompt``.

    Raises:
        TaskFormatError: an unknown key, a bad value, an unknown task or group, a dataset that is not local, a task
            type or metric we cannot score, naming `where` and the task.
    """
    unknown = sorted(set(data) - OPTIONS)
    if unknown:
        raise TaskFormatError(f"{where}: unknown field(s) {unknown} for an lm_eval task; expected some of "
                              f"{sorted(OPTIONS)}")
    name = data["lm_eval"]
    where = f"{where} (lm_eval task {name!r})"
    limit = _int_option(data, "limit", 1, where)
    num_fewshot = _int_option(data, "num_fewshot", 0, where)
    seed = _int_option(data, "fewshot_seed", 0, where)
    seed = FEWSHOT_SEED if seed is None else seed
    include = _include_path(data, base_dir, where)
    chat = _chat_options(data, where)
    task = harness_task(name, include, num_fewshot)
    output_type = task.get_config("output_type")
    if output_type not in TYPES:
        raise TaskFormatError(f"{where}: output_type {output_type!r} is not scored here; expected one of "
                              f"{sorted(TYPES)}")
    our_type, metrics = TYPES[output_type]
    if chat.get("apply_chat_template") and output_type == "loglikelihood_rolling":
        raise TaskFormatError(f"{where}: apply_chat_template applies to multiple_choice and generate_until tasks (the "
                              "harness scores a rolling text without a template)")
    metric, filter_name = _metric(task, data, metrics, where), _filter(task, data, output_type, where)
    splits = _splits(task, where)
    meta = {"task": name, "harness_version": harness_version(), "config_sha256": config_sha256(task),
            "output_type": output_type, "num_fewshot": task.get_config("num_fewshot"), "fewshot_seed": seed,
            "limit": limit, "include_path": include, "metric": metric, "filter": filter_name, "splits": splits,
            **({"group": group} if group is not None else {}), **chat}
    folder = cache_root() / f"{name}-{hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]}"
    paths = {}
    for ours, theirs in splits.items():
        if theirs is None:
            continue
        records = build_records(task, theirs, limit, seed, where, chat)
        paths[ours] = str(folder / f"{ours}.jsonl")
        _write_if_changed(Path(paths[ours]), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    generation = task.get_config("generation_kwargs") or {}
    options = chat_option({key: data[key] for key in ("chat_template", "system_prompt") if key in data}, where)
    if chat.get("apply_chat_template"):  # the tokenizer must have a template (checked before the model loads)
        options = {"chat_template": True}
    extra: dict[str, Any] = {}
    if output_type == "generate_until":
        extra = _generation_options(task, generation, where)
    return TaskSpec(name=data.get("name", name), type=our_type, path=paths["validation"],
                    metric=metrics.get(metric, ""), weight=data.get("weight", 1.0), test_path=paths.get("test"),
                    lm_eval=meta, **options, **extra)


def _chat_options(data: dict[str, Any], where: str) -> dict[str, Any]:
    """The harness's chat options of a spec, checked: ``apply_chat_template``, ``fewshot_as_multiturn`` (with it
    only; default true, as ``simple_evaluate``'s) and ``system_instruction`` (also without a template, as text)."""
    apply = data.get("apply_chat_template", False)
    multiturn = data.get("fewshot_as_multiturn")
    system = data.get("system_instruction")
    for key, value in (("apply_chat_template", apply), ("fewshot_as_multiturn", multiturn)):
        if value is not None and not isinstance(value, bool):
            raise TaskFormatError(f"{where}: '{key}' must be true or false, got {value!r}")
    if system is not None and not isinstance(system, str):
        raise TaskFormatError(f"{where}: 'system_instruction' must be a string, got {system!r}")
    if multiturn is not None and not apply:
        raise TaskFormatError(f"{where}: 'fewshot_as_multiturn' needs 'apply_chat_template: true'")
    if apply and ("chat_template" in data or "system_prompt" in data):
        raise TaskFormatError(f"{where}: give either the harness's 'apply_chat_template' (its conversation, "
                              "'system_instruction') or our 'chat_template' (the whole context as one user message), "
                              "not both")
    chat: dict[str, Any] = {}
    if apply:
        chat.update(apply_chat_template=True, fewshot_as_multiturn=True if multiturn is None else multiturn)
    if system is not None:
        chat["system_instruction"] = system
    return chat


def _capture(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """A chat template for the harness's ``fewshot_context`` that returns the conversation itself (`CHAT_MARK`,
    then JSON), to be rendered later by the scored model's tokenizer."""
    return CHAT_MARK + json.dumps({"messages": messages, "add_generation_prompt": add_generation_prompt})


def _metric(task, data: dict, metrics: dict[str, str], where: str) -> str | None:
    """The harness metric the task is scored by: ``data["metric"]`` or the task's first that we score."""
    listed = list(task._metric_fn_list)
    if not metrics:  # language modelling: the fitness is minus the mean NLL per token
        if data.get("metric") is not None:
            raise TaskFormatError(f"{where}: a loglikelihood_rolling task is scored by minus the mean NLL per token "
                                  "(its harness perplexities come from the same sums); leave 'metric' out")
        return None
    usable = [m for m in listed if m in metrics]
    metric = data.get("metric", usable[0] if usable else None)
    if metric not in metrics or metric not in listed:
        raise TaskFormatError(f"{where}: metric {metric!r} cannot be scored here; the task lists {listed}, of which "
                              f"we score {usable}")
    return metric


def _filter(task, data: dict, output_type: str, where: str) -> str | None:
    """The name of the harness filter pipeline a generation task is scored after (default its first)."""
    names = [ensemble.name for ensemble in task._filters]
    if output_type != "generate_until":
        if data.get("filter") is not None:
            raise TaskFormatError(f"{where}: 'filter' applies to generate_until tasks only")
        return None
    chosen = data.get("filter", names[0])
    if chosen not in names:
        raise TaskFormatError(f"{where}: filter {chosen!r} is not one of the task's filter pipelines {names}")
    return chosen


def _generation_options(task, generation: dict, where: str) -> dict[str, Any]:
    """Our decoding settings from the harness's ``generation_kwargs``: greedy, ``until``, ``max_gen_toks``."""
    from lm_eval.models.utils import normalize_gen_kwargs

    kwargs = normalize_gen_kwargs(dict(generation))
    if kwargs.get("do_sample"):
        raise TaskFormatError(f"{where}: the task samples (do_sample: true); only greedy decoding is scored here")
    until = kwargs.get("until") or []
    until = [until] if isinstance(until, str) else [stop for stop in until if stop]
    return {"max_new_tokens": int(kwargs["max_gen_toks"]), "stop": tuple(until) or ("\n\n",)}


def build_records(task, split: str, limit: int | None, seed: int, where: str,
                  chat: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Our records for the first `limit` documents of a harness split, each from the request the harness builds
    (the few-shot seed reset first, as ``simple_evaluate`` does before building a task's requests); `chat`: the
    harness's chat options (`_chat_options`)."""
    chat = chat or {}
    apply = bool(chat.get("apply_chat_template"))
    context_options = {"system_instruction": chat.get("system_instruction"), "apply_chat_template": apply,
                       "fewshot_as_multiturn": bool(chat.get("fewshot_as_multiturn")),
                       "chat_template": _capture if apply else None}
    task.set_fewshot_seed(seed=seed)
    output_type = task.get_config("output_type")
    records = []
    for doc_id, doc in enumerate(split_docs(task, split)):
        if limit is not None and doc_id >= limit:
            break
        context = task.fewshot_context(doc, num_fewshot=task.get_config("num_fewshot") or 0,
                                       **({} if output_type == "loglikelihood_rolling" else
                                          {"gen_prefix": task.doc_to_prefix(doc), **context_options}))
        requests = task.construct_requests(doc=doc, ctx=context, metadata=(task.config.task, doc_id, 1),
                                           apply_chat_template=apply)
        records.append(_record(task, doc, doc_id, requests, output_type, f"{where}, {split} document {doc_id}"))
    if not records:
        raise TaskFormatError(f"{where}: the harness's {split} split holds no documents")
    return records


def _record(task, doc, doc_id: int, requests, output_type: str, where: str) -> dict[str, Any]:
    if output_type == "loglikelihood_rolling":
        (text,) = requests.arguments
        return {"text": text, "doc_id": doc_id}
    if output_type == "generate_until":
        context, _ = requests.arguments
        chat = _captured(context)
        return {"prompt": _plain(chat) if chat else context, "answer": str(task.doc_to_target(doc)), "doc_id": doc_id,
                **({"chat": chat} if chat else {})}
    if task.multiple_input or task.multiple_target:
        raise TaskFormatError(f"{where}: multiple-input or multiple-target choice tasks are not scored here")
    pairs = [request.arguments[:2] for request in requests][: len(task.doc_to_choice(doc))]
    context = pairs[0][0]
    chat = _captured(context)
    if chat:  # rendered by the scored model's tokenizer, its trailing whitespace moved then (`chat.prompt_ids`)
        gold, choices = task.doc_to_target(doc), task.doc_to_choice(doc)
        answer = _answer(gold, choices, where)
        return {"prompt": _plain(chat), "choices": [continuation for _, continuation in pairs], "answer": answer,
                "doc_id": doc_id, "chat": chat}
    spaces = len(context) - len(context.rstrip())  # moved into each choice, as the harness's HF model does
    prompt, moved = (context[:-spaces], context[-spaces:]) if spaces else (context, "")
    if not prompt:
        raise TaskFormatError(f"{where}: the context is empty; expected text to score the choices after")
    answer = _answer(task.doc_to_target(doc), task.doc_to_choice(doc), where)
    return {"prompt": prompt, "choices": [moved + continuation for _, continuation in pairs], "answer": answer,
            "doc_id": doc_id}


def _answer(gold, choices: list[str], where: str) -> int:
    """The index of the gold choice (the target is a choice's text or its index)."""
    answer = choices.index(gold) if isinstance(gold, str) and gold in choices else gold
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise TaskFormatError(f"{where}: the target {gold!r} is not one of the {len(choices)} choices")
    return answer


def _captured(context: str) -> dict[str, Any] | None:
    """The conversation `_capture` put into a context, or None for a plain one."""
    return json.loads(context[len(CHAT_MARK):]) if context.startswith(CHAT_MARK) else None


def _plain(chat: dict[str, Any]) -> str:
    """A conversation's text without a template (what the record shows and what length checks count first)."""
    return "\n\n".join(message["content"] for message in chat["messages"])


def _write_if_changed(path: Path, text: str) -> None:
    """Write `text` to `path` atomically unless it already holds exactly that."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)


def spec_task(spec: TaskSpec):
    """The harness task a built spec came from, and the harness split its current file holds.

    Raises:
        TaskFormatError: the harness task's config changed since the files were built (its hash differs).
    """
    meta = spec.lm_eval
    task = harness_task(meta["task"], meta.get("include_path"), meta.get("num_fewshot"))
    if config_sha256(task) != meta["config_sha256"]:
        raise TaskFormatError(f"task {spec.name!r}: the harness task {meta['task']!r} changed since its files were "
                              f"built (config hash {config_sha256(task)[:12]} != {meta['config_sha256'][:12]}); build "
                              "the spec again")
    ours = "test" if spec.test_path is not None and spec.path == spec.test_path else "validation"
    return task, meta["splits"][ours]
