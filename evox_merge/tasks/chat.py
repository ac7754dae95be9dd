"""Chat templates: a task's prompt as the user message of the tokenizer's own chat template.

With ``chat_template: true`` on a task spec, every prompt the scorers read (multiple choice, generation: the
prefix and the filled prompt template; language modelling: the prefix, the text then scored as the reply) becomes

    tokenizer.apply_chat_template([{"role": "system", ...}?, {"role": "user", "content": prompt}],
                                  tokenize=False, add_generation_prompt=True)

tokenised without adding special tokens (the template writes them), so the ids equal what
``apply_chat_template(..., tokenize=True)`` gives. A tokenizer without a template is refused before the model loads
(`check_chat_templates`, from the tokenizer's files); recipe.json records the template's SHA-256 (`chat_facts`).

Torch-free: the spec module imports it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from evox_merge.util.errors import TaskFormatError

if TYPE_CHECKING:
    from evox_merge.tasks.spec import TaskSpec

# Where transformers keeps a tokenizer's chat template: tokenizer_config.json's "chat_template" or one of these.
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def chat_option(data: dict[str, Any], where: str) -> dict[str, Any]:
    """``chat_template: {system: "..."}`` as the spec's two fields (``chat_template: true`` plus ``system_prompt``);
    other values pass through to `TaskSpec`'s checks."""
    option = data.get("chat_template")
    if not isinstance(option, dict):
        return data
    unknown = sorted(set(option) - {"system"})
    if unknown:
        raise TaskFormatError(f"{where}: chat_template: unknown key(s) {unknown}; expected true, false or "
                              "{system: '...'}")
    if "system_prompt" in data:
        raise TaskFormatError(f"{where}: give the system prompt once: chat_template: {{system: ...}} or "
                              "system_prompt, not both")
    system = option.get("system", "")
    if not isinstance(system, str):
        raise TaskFormatError(f"{where}: chat_template.system must be a string, got {system!r}")
    return {**data, "chat_template": True, "system_prompt": system}


def chat_messages(user: str, system: str = "") -> list[dict[str, str]]:
    """The conversation a prompt becomes: the system message (where one is set), then the prompt as the user's."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def chat_text(tokenizer: Any, user: str, system: str = "") -> str:
    """The tokenizer's chat template over `chat_messages`, with the generation prompt added, as text."""
    return tokenizer.apply_chat_template(chat_messages(user, system), tokenize=False, add_generation_prompt=True)


def prompt_ids(spec: "TaskSpec", tokenizer: Any, records: Sequence[dict[str, Any]]) -> list[list[int]]:
    """The token ids the scorers read for each record's prompt of a multiple-choice or generation task: a harness
    conversation (``chat``, `harness_context`), the templated prompt without added special tokens (`chat_text`),
    or the prompt with the tokenizer's special tokens."""
    if any("chat" in record for record in records):
        return [_harness_ids(tokenizer, harness_context(spec, tokenizer, record)[0]) for record in records]
    prompts = [record["prompt"] for record in records]
    if spec.chat_template:
        texts = [chat_text(tokenizer, prompt, spec.system_prompt) for prompt in prompts]
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return tokenizer(list(prompts), add_special_tokens=True)["input_ids"] if prompts else []


def choice_texts(spec: "TaskSpec", tokenizer: Any, record: dict[str, Any]) -> list[str]:
    """A multiple-choice record's choices as the scorers tokenise them: after a harness conversation, each with the
    rendered context's trailing whitespace in front (`harness_context`)."""
    if "chat" not in record:
        return list(record["choices"])
    moved = harness_context(spec, tokenizer, record)[1]
    return [moved + choice for choice in record["choices"]]


def harness_context(spec: "TaskSpec", tokenizer: Any, record: dict[str, Any]) -> tuple[str, str]:
    """A harness record's conversation (``chat``: the messages lm-evaluation-harness built with
    ``apply_chat_template``) rendered as the harness's HF model renders it (``add_generation_prompt``, else
    ``continue_final_message``; a template that refuses the system role gets the conversation without it), and
    for multiple choice the rendered text's trailing whitespace, which the harness moves into each choice:
    ``(context, moved)``."""
    import jinja2

    chat = record["chat"]
    flag = bool(chat["add_generation_prompt"])
    try:
        text = tokenizer.apply_chat_template(chat["messages"], tokenize=False, add_generation_prompt=flag,
                                             continue_final_message=not flag)
    except jinja2.exceptions.TemplateError:
        messages = [message for message in chat["messages"] if message["role"] != "system"]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=flag,
                                             continue_final_message=not flag)
    if spec.type != "multiple_choice":
        return text, ""
    kept = text.rstrip()
    return kept, text[len(kept):]


def _harness_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of rendered text as the harness's HF model encodes it: with the tokenizer's special tokens unless the
    text already starts with its BOS."""
    bos = tokenizer.bos_token
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]


def context_ids(spec: "TaskSpec", tokenizer: Any) -> list[int]:
    """The ids a language-modelling task's texts are scored after: the templated prefix (`chat_template`), the
    prefix, for a harness task (``lm_eval``) the token lm-evaluation-harness puts before a rolling text (BOS, else
    EOS), else none (the text's first token is then the context)."""
    if spec.chat_template:
        return tokenizer(chat_text(tokenizer, spec.prefix, spec.system_prompt), add_special_tokens=False)["input_ids"]
    if spec.prefix:
        return tokenizer(spec.prefix, add_special_tokens=True)["input_ids"]
    if spec.lm_eval is not None:
        token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [] if token is None else [token]
    return []


def template_of(tokenizer: Any) -> str | None:
    """The tokenizer's chat template text (the ``default`` one of named templates), or None."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) and template else None


def read_chat_template(folder: str | Path) -> str | None:
    """A tokenizer folder's chat template read from its files, without loading anything: tokenizer_config.json's
    ``chat_template`` (a string, or named templates of which ``default``), chat_template.jinja or
    chat_template.json; None where none is set."""
    folder = Path(folder)
    found: Any = None
    config = folder / "tokenizer_config.json"
    if config.is_file():
        try:
            found = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, UnicodeDecodeError, AttributeError):
            found = None
    if found is None and (folder / TEMPLATE_FILES[0]).is_file():
        found = (folder / TEMPLATE_FILES[0]).read_text(encoding="utf-8")
    if found is None and (folder / TEMPLATE_FILES[1]).is_file():
        try:
            found = json.loads((folder / TEMPLATE_FILES[1]).read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, UnicodeDecodeError, AttributeError):
            found = None
    if isinstance(found, list):  # named templates: [{"name": ..., "template": ...}]
        found = {item.get("name"): item.get("template") for item in found if isinstance(item, dict)}.get("default")
    return found if isinstance(found, str) and found else None


def check_chat_templates(specs: Sequence["TaskSpec"], tokenizer: Any, source: str, seq2seq: bool = False) -> None:
    """Refuse, before the model loads, a spec asking for a chat template the tokenizer lacks, and a chat-templated
    or harness-built spec on an encoder-decoder model (whose scorers read raw prompts).

    Raises:
        TaskFormatError: naming the task and where the tokenizer came from.
    """
    for spec in specs:
        if seq2seq and spec.lm_eval is not None:
            raise TaskFormatError(f"task {spec.name!r}: lm-evaluation-harness tasks are scored on decoder-only models; "
                                  f"{source} is an encoder-decoder model")
        if not spec.chat_template:
            continue
        if seq2seq:
            raise TaskFormatError(f"task {spec.name!r}: chat_template is set but {source} is an encoder-decoder model, "
                                  "whose scorers read the prompts as they are; leave chat_template out")
        if template_of(tokenizer) is None:
            raise TaskFormatError(f"task {spec.name!r}: chat_template is set but the tokenizer of {source} has no chat "
                                  "template (tokenizer_config.json 'chat_template', chat_template.jinja); use an "
                                  "instruct model's tokenizer (in a search config, the 'tokenizer' key) or leave "
                                  "chat_template out")


def chat_facts(spec: "TaskSpec", tokenizer: Any) -> dict[str, Any]:
    """For recipe.json: the SHA-256 of the chat template a task's prompts went through (nothing without one)."""
    template = template_of(tokenizer) if spec.chat_template else None
    if template is None:
        return {}
    return {"chat_template_sha256": hashlib.sha256(template.encode("utf-8")).hexdigest()}
