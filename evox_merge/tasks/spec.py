"""Task specs and task files: what a validation set is, read and checked before any compute.

A task is a JSONL file plus a small spec. One JSON object per line:

* ``multiple_choice``: ``{"prompt": str, "choices": [str, ...], "answer": int | str}``; scored by the
  log-likelihood of each choice after the prompt (metric ``accuracy``, or ``accuracy_norm`` to divide each
  choice's log-likelihood by its length in characters).
* ``generation``: ``{"prompt": str, "answer": str}``; greedy decoding cut at the first stop string, scored by exact
  match after normalisation: ends stripped, inner whitespace collapsed, case kept (metric ``exact_match``).
* ``language_modeling``: ``{"text": str}``; scored by minus the mean per-token NLL (metric ``neg_nll``,
  higher is better like every fitness here).

The prompt shown to the model is ``prefix + prompt_template.format(**record)``, so a template may use any field
of the record by its plain name (default ``"{prompt}"``; no attribute access, indexing, conversion or format spec,
no answer field, and a field it uses must hold text or a number); ``prefix`` (default empty) is the same text before
every example, e.g. few-shot demonstrations (a language-modelling text is scored after it, and takes no template).

With ``chat_template: true`` (or ``chat_template: {system: "..."}``) every prompt (the prefix and the filled
template; a language-modelling task's prefix) is the user message of the tokenizer's chat template, after the optional
system prompt, with the generation prompt added (`evox_merge.tasks.chat`). A spec with ``lm_eval`` names an
lm-evaluation-harness task, built into these files by `evox_merge.tasks.lm_eval_tasks`.

A test file (``test_path``) must be another file than the validation file and hold at least one example the
validation file lacks; test examples that are also validation examples are counted (`split_overlap`) and reported
as a warning in the run's log, recipe.json and model card.
"""

from __future__ import annotations

import json
import math
import os
import random
import string
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator


from evox_merge.tasks.chat import chat_option
from evox_merge.util.hashing import file_sha256
from evox_merge.util.errors import TaskFormatError

TASK_TYPES = {
    "multiple_choice": ("accuracy", "accuracy_norm"),
    "generation": ("exact_match",),
    "language_modeling": ("neg_nll",),
}
# The fields the prompt template uses are required as well (checked when the template is filled).
REQUIRED_FIELDS = {
    "multiple_choice": ("choices", "answer"),
    "generation": ("answer",),
    "language_modeling": ("text",),
}
# The record field each task type is scored against: a prompt template that uses it hands the model the answer.
ANSWER_FIELDS = {"multiple_choice": "answer", "generation": "answer"}


@dataclass(frozen=True)
class TaskSpec:
    """How to score one task.

    Attributes:
        name: short unique name used in records and tables.
        type: one of ``multiple_choice``, ``generation``, ``language_modeling``.
        path: the JSONL file (validation split when searching).
        metric: defaults to the type's first metric (``accuracy``, ``exact_match``, ``neg_nll``).
        prompt_template: ``str.format`` template over the record's fields.
        weight: weight of this task in the mean fitness.
        max_new_tokens: generation only: decoding stops after this many tokens.
        stop: generation only: the completion is cut at the first of these strings.
        test_path: optional held-out split, scored only for reports, never for search.
        prefix: text put before every example, e.g. few-shot demonstrations or instructions: before each prompt
            (multiple choice, generation), or as context that each text is scored after (language modelling).
            Every row then starts with the same tokens, which the scorers run once per candidate
            (`evox_merge.tasks.prefix`).
        chat_template: ``true`` (or ``{system: "..."}``, which sets `system_prompt` too): every prompt goes through
            the tokenizer's chat template as the user message (`evox_merge.tasks.chat`).
        system_prompt: the system message before each prompt (only with `chat_template`).
        lm_eval: the name of an lm-evaluation-harness task, with optional ``limit``, ``num_fewshot``,
            ``fewshot_seed``, ``include_path``, ``metric``, ``filter`` (then no ``type`` or ``path``: the harness task
            is built into JSONL files, `evox_merge.tasks.lm_eval_tasks`); in a built spec, the harness facts (task,
            version, config hash, splits).
    """

    name: str
    type: str
    path: str
    metric: str = ""
    prompt_template: str = "{prompt}"
    weight: float = 1.0
    max_new_tokens: int = 16
    stop: tuple[str, ...] = ("\n",)
    test_path: str | None = None
    prefix: str = ""
    chat_template: bool = False
    system_prompt: str = ""
    lm_eval: str | dict[str, Any] | None = None

    def __post_init__(self) -> None:
        where = f"task {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise TaskFormatError(f"task {self.name!r}: field 'name' must be a non-empty string")
        for key in ("type", "path", "metric", "prefix"):
            if not isinstance(getattr(self, key), str):
                raise TaskFormatError(f"{where}: field {key!r} must be a string, got {getattr(self, key)!r}")
        if self.test_path is not None and not isinstance(self.test_path, str):
            raise TaskFormatError(f"{where}: field 'test_path' must be a string, got {self.test_path!r}")
        if self.type not in TASK_TYPES:
            raise TaskFormatError(
                f"{where}: field 'type' is {self.type!r}; expected one of {sorted(TASK_TYPES)}"
            )
        if not self.metric:
            object.__setattr__(self, "metric", TASK_TYPES[self.type][0])
        if self.metric not in TASK_TYPES[self.type]:
            raise TaskFormatError(
                f"{where}: metric {self.metric!r} does not apply to type {self.type!r}; "
                f"expected one of {TASK_TYPES[self.type]}"
            )
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)):
            raise TaskFormatError(f"{where}: field 'weight' must be a number >= 0, got {self.weight!r}")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise TaskFormatError(f"{where}: field 'weight' must be a finite number >= 0, got {self.weight}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise TaskFormatError(f"{where}: field 'max_new_tokens' must be an integer >= 1, got "
                                  f"{self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise TaskFormatError(f"{where}: field 'max_new_tokens' must be >= 1, got {self.max_new_tokens}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop  # one string is one stop string
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise TaskFormatError(f"{where}: field 'stop' must be a non-empty string or a list of them, got "
                                  f"{self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        if not isinstance(self.chat_template, bool):
            raise TaskFormatError(f"{where}: field 'chat_template' must be true, false or {{system: '...'}}, got "
                                  f"{self.chat_template!r}")
        if not isinstance(self.system_prompt, str):
            raise TaskFormatError(f"{where}: field 'system_prompt' must be a string, got {self.system_prompt!r}")
        if self.system_prompt and not self.chat_template:
            raise TaskFormatError(f"{where}: a system prompt needs the chat template; write chat_template: "
                                  "{system: '...'}")
        if self.lm_eval is not None and not isinstance(self.lm_eval, dict):
            raise TaskFormatError(f"{where}: field 'lm_eval' must name a harness task in a spec mapping (built by "
                                  f"spec_sources.task_spec_from_dict), got {self.lm_eval!r}")
        used = template_fields(self.prompt_template, where)
        if self.type == "language_modeling" and self.prompt_template != "{prompt}":
            raise TaskFormatError(f"{where}: prompt_template {self.prompt_template!r} is not used by a "
                                  "language_modeling task (its 'text' field is scored as it is); leave it out, or put "
                                  "shared context in 'prefix'")
        answer = ANSWER_FIELDS.get(self.type)
        if answer in used:
            raise TaskFormatError(f"{where}: prompt_template {self.prompt_template!r} uses the answer field "
                                  f"{{{answer}}}: every prompt would hold the answer it is scored on; use only input "
                                  "fields such as '{prompt}'")

    def with_split(self, split: str) -> "TaskSpec":
        """The same spec pointing at its ``validation`` (``path``) or ``test`` (``test_path``) file."""
        if split == "validation":
            return self
        if split == "test":
            if self.test_path is None:
                raise TaskFormatError(f"task {self.name!r} has no 'test_path'")
            return TaskSpec(**{**asdict(self), "path": self.test_path})
        raise TaskFormatError(f"split must be 'validation' or 'test', got {split!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``stop`` as a list; ``prefix``, ``chat_template``, ``system_prompt`` and ``lm_eval``
        only where set, so specs written before those fields existed read back the same)."""
        data = {**asdict(self), "stop": list(self.stop)}
        for key in ("prefix", "chat_template", "system_prompt", "lm_eval"):
            if not data[key]:
                del data[key]
        return data

    def file_hashes(self) -> dict[str, str]:
        """SHA-256 of the task's files: ``{"sha256": validation}`` plus ``"test_sha256"`` where a test file is set."""
        hashes = {"sha256": file_sha256(self.path)}
        if self.test_path is not None:
            hashes["test_sha256"] = file_sha256(self.test_path)
        return hashes


@dataclass(frozen=True)
class Task:
    """A spec with its records read and checked."""

    spec: TaskSpec
    records: list[dict[str, Any]] = field(repr=False)

    @property
    def name(self) -> str:
        return self.spec.name


def template_fields(template: Any, where: str = "task") -> list[str]:
    """The record fields a ``prompt_template`` uses.

    Raises:
        TaskFormatError: not a string, not a valid template, or a field that is not a plain record field name
            (positional ``{}``, attribute access ``{prompt.upper}``, indexing ``{prompt[0]}``, a conversion
            ``{prompt!r}`` or a format spec ``{prompt:>9}``: each formats to something else than the field's text).
    """
    if not isinstance(template, str):
        raise TaskFormatError(f"{where}: field 'prompt_template' must be a string such as '{{prompt}}', got "
                              f"{template!r}")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise TaskFormatError(f"{where}: prompt_template {template!r} is not a valid template ({error}); write a "
                              "literal brace as '{{' or '}}'") from None
    names = []
    for _, field_name, format_spec, conversion in parsed:
        if field_name is None:
            continue
        key = field_name.split(".")[0].split("[")[0]
        if not key or key.isdigit():
            raise TaskFormatError(f"{where}: prompt_template {template!r} uses a positional field "
                                  f"{{{field_name}}}; name a record field instead, e.g. '{{prompt}}'")
        if field_name != key or conversion is not None or format_spec:
            written = "{" + field_name + (f"!{conversion}" if conversion else "") + (
                f":{format_spec}" if format_spec else "") + "}"
            raise TaskFormatError(f"{where}: prompt_template {template!r} uses {written}, which formats to something "
                                  f"else than the field {key!r} (attribute access, indexing, conversions and format "
                                  f"specs are not allowed); use plain record field names such as '{{{key}}}'")
        names.append(key)
    return names


def check_task_specs(specs: list["TaskSpec"], where: str = "tasks") -> None:
    """A list of specs a run can use: at least one, unique names, and not every weight zero."""
    if not specs:
        raise TaskFormatError(f"{where}: no tasks; expected at least one task spec")
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise TaskFormatError(f"{where}: duplicate task name(s) {duplicates}; every task needs its own name (scores "
                              "are recorded by name)")
    if not any(spec.weight > 0 for spec in specs):
        raise TaskFormatError(f"{where}: every task has weight 0; expected at least one positive weight")
    for spec in specs:
        if spec.test_path is not None and _same_file(spec.path, spec.test_path):
            raise TaskFormatError(f"{where}: task {spec.name!r}: test_path {spec.test_path} is the same file as path; "
                                  "the test split must hold examples that never chose anything (give a separate test "
                                  "file, or leave test_path out)")


def _same_file(first: str, second: str) -> bool:
    """Whether two paths name one file (the same path, a symbolic link or a hard link to it)."""
    try:
        return os.path.samefile(first, second)
    except OSError:  # one is missing (reported by the file checks): compare the paths
        return Path(first).absolute().resolve() == Path(second).absolute().resolve()


def plain_spec_from_dict(data: dict[str, Any], base_dir: str | Path | None = None, where: str = "task") -> TaskSpec:
    """Build a `TaskSpec` from a mapping of its fields (not a harness task: `evox_merge.tasks.spec_sources`);
    relative paths are resolved against `base_dir`."""
    data = chat_option(data, where)
    known = {f.name for f in fields(TaskSpec)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise TaskFormatError(f"{where}: unknown field(s) {unknown}; expected some of {sorted(known)}")
    missing = [key for key in ("name", "type", "path") if key not in data]
    if missing:
        raise TaskFormatError(f"{where}: missing field(s) {missing}")
    data = dict(data)
    for key in ("path", "test_path"):
        if isinstance(data.get(key), str) and base_dir is not None:
            data[key] = str(Path(base_dir, data[key]).expanduser().absolute())
    return TaskSpec(**data)


def read_task(spec: TaskSpec, limit: int | None = None) -> Task:
    """Read and check every line of ``spec.path``; errors name the file, the line and the field.

    Args:
        limit: keep only the first `limit` examples (every line is still checked).
    """
    records = [record for _, record in iter_records(spec)]
    if not records:
        raise TaskFormatError(f"task {spec.name!r}: file {spec.path} holds no examples")
    return Task(spec, records[:limit])


def iter_records(spec: TaskSpec) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each example of ``spec.path``, checked and normalised as in `read_task`, with where it is (``file:line``).

    Raises:
        TaskFormatError: a missing file or a bad line, naming the file, the line and the field.
    """
    path = Path(spec.path)
    if not path.is_file():
        what = "is a directory; expected a JSONL file" if path.is_dir() else "does not exist"
        raise TaskFormatError(f"task {spec.name!r}: file {path} {what}")
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            where = f"{path}:{line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise TaskFormatError(f"{where}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column "
                                      f"{error.start + 1}); task files must be UTF-8 JSONL") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise TaskFormatError(f"{where}: malformed JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict):
                raise TaskFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, _checked_record(record, spec, where)


def model_input(record: dict[str, Any]) -> str:
    """What the model reads of a checked record: its prompt (multiple choice, generation) or its text."""
    return record["text"] if "text" in record else record["prompt"]


def split_overlap(spec: TaskSpec) -> dict[str, Any] | None:
    """How many of the test file's examples are also validation examples (the same model input: the prompt as
    shown to the model, or the text); None without a test file or without overlap.

    Returns:
        ``{"test_examples": n, "also_in_validation": k, "warning": "<one line naming the task and both files>"}``.

    Raises:
        TaskFormatError: every test example is also a validation example (the test split would report nothing
            held out: a copy of the validation file, or the wrong file).
    """
    if spec.test_path is None:
        return None
    validation = {model_input(record) for _, record in iter_records(spec)}
    test = [model_input(record) for _, record in iter_records(spec.with_split("test"))]
    shared = sum(text in validation for text in test)
    if not shared:
        return None
    if shared == len(test):
        same = "text" if spec.type == "language_modeling" else "prompt"
        raise TaskFormatError(f"every one of the {len(test)} test examples of {spec.test_path} is also in the "
                              f"validation file {spec.path} (same {same}): the test split would measure nothing "
                              "held out; give test examples the validation file lacks (or leave test_path out)")
    warning = (f"task {spec.name!r}: {shared} of the {len(test)} test examples of {spec.test_path} are also in the "
               f"validation file {spec.path}, which chose the release: their test scores are not held out")
    return {"test_examples": len(test), "also_in_validation": shared, "warning": warning}


def split_task(task: Task, selection_fraction: float, search_limit: int | None = None) -> tuple[Task, Task | None]:
    """Split a validation task into a search part and a selection part.

    The examples are shuffled by a generator seeded with the task's name (the same split for every search seed and
    every run on the same file); the first ``round(selection_fraction * n)`` shuffled examples (at least one when
    the fraction is positive, and never all of them) form the selection part, the rest the search part, of which
    `search_limit` are kept. Each part keeps the file's order.

    Returns:
        ``(search, selection)``; `selection` is None when `selection_fraction` is 0.
    """
    if not 0 <= selection_fraction < 1:
        raise TaskFormatError(f"selection_fraction must be in [0, 1), got {selection_fraction}")
    n = len(task.records)
    if selection_fraction == 0:
        return Task(task.spec, task.records[:search_limit]), None
    if n < 2:
        raise TaskFormatError(f"task {task.name!r}: {task.spec.path} holds {n} example(s); a search part and a "
                              "selection part need at least 2 (or set selection_fraction: 0)")
    order = list(range(n))
    random.Random(task.name).shuffle(order)
    size = min(max(1, round(selection_fraction * n)), n - 1)
    selection, search = sorted(order[:size]), sorted(order[size:])
    search = search[:search_limit]
    return Task(task.spec, [task.records[i] for i in search]), Task(task.spec, [task.records[i] for i in selection])


def _checked_record(record: dict[str, Any], spec: TaskSpec, where: str) -> dict[str, Any]:
    """Check one record's fields for its task type; normalise a multiple-choice answer to an index."""
    for key in REQUIRED_FIELDS[spec.type]:
        if key not in record:
            raise TaskFormatError(f"{where}: missing field {key!r} (type {spec.type} needs "
                                  f"{REQUIRED_FIELDS[spec.type]})")
    for key in template_fields(spec.prompt_template) if spec.type != "language_modeling" else ():
        value = record.get(key)
        if key in record and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
            raise TaskFormatError(f"{where}: prompt_template {spec.prompt_template!r} uses field {key!r}, which holds "
                                  f"{json.dumps(value)[:60]}; a template field must hold text or a number (its Python "
                                  "repr would reach the prompt)")
    try:
        prompt = spec.prefix + spec.prompt_template.format(**record) if spec.type != "language_modeling" else ""
    except (KeyError, IndexError, AttributeError, TypeError, ValueError) as error:
        raise TaskFormatError(f"{where}: prompt_template {spec.prompt_template!r} needs field {error} (the record "
                              f"has {sorted(record)})") from None
    if spec.type == "language_modeling":
        if not isinstance(record["text"], str) or not record["text"]:
            raise TaskFormatError(f"{where}: field 'text' must be a non-empty string")
        return {"text": record["text"], **_harness_fields(record, spec, where)}
    if not prompt:  # it tokenises to nothing: no context to score a choice or an answer after
        raise TaskFormatError(f"{where}: the prompt is empty (prefix + prompt_template {spec.prompt_template!r} give "
                              "''); expected text for the model to continue")
    if spec.type == "generation":
        if not isinstance(record["answer"], str):
            raise TaskFormatError(f"{where}: field 'answer' must be a string")
        return {"prompt": prompt, "answer": record["answer"], **_harness_fields(record, spec, where)}
    choices = record["choices"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise TaskFormatError(f"{where}: field 'choices' must be a list of at least 2 non-empty strings")
    repeated = sorted({c for c in choices if choices.count(c) > 1})
    if repeated:
        raise TaskFormatError(f"{where}: field 'choices' repeats {repeated}; expected distinct choices (the answer "
                              "would be ambiguous)")
    answer = record["answer"]
    if isinstance(answer, bool) or not isinstance(answer, (int, str)):
        raise TaskFormatError(f"{where}: field 'answer' must be a choice index or one of the choices")
    if isinstance(answer, str):
        if answer not in choices:
            raise TaskFormatError(f"{where}: answer {answer!r} is not one of the choices {choices}")
        answer = choices.index(answer)
    elif not 0 <= answer < len(choices):
        raise TaskFormatError(f"{where}: answer index {answer} is outside the {len(choices)} choices")
    return {"prompt": prompt, "choices": choices, "answer": answer, **_harness_fields(record, spec, where)}


def _harness_fields(record: dict[str, Any], spec: TaskSpec, where: str) -> dict[str, Any]:
    """A harness-built record's ``doc_id`` (the index of its document in the harness split), kept for scoring with
    the harness's own metrics, and its ``chat`` (the conversation the harness built with ``apply_chat_template``:
    ``messages`` and ``add_generation_prompt``; `evox_merge.tasks.lm_eval_tasks`); nothing for other tasks."""
    if spec.lm_eval is None:
        return {}
    doc_id = record.get("doc_id")
    if isinstance(doc_id, bool) or not isinstance(doc_id, int) or doc_id < 0:
        raise TaskFormatError(f"{where}: a harness-built record needs an integer 'doc_id' >= 0, got {doc_id!r}")
    if "chat" not in record:
        return {"doc_id": doc_id}
    chat = record["chat"]
    messages = chat.get("messages") if isinstance(chat, dict) else None
    if (not isinstance(messages, list) or not messages or not isinstance(chat.get("add_generation_prompt"), bool)
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                       for m in messages)):
        raise TaskFormatError(f"{where}: 'chat' must hold 'messages' (a list of role/content strings) and "
                              "'add_generation_prompt' (true or false)")
    return {"doc_id": doc_id, "chat": chat}
