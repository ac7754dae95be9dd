"""Error-table cases: inputs accepted silently before (run by tests/test_errors.py; see tests/error_harness.py).

Each is refused before the model loads where the files can answer it: duplicate YAML keys (and JSON keys in
adapter_config.json), the same expert twice, a folder given as a task spec file, a test file that is the
validation file, examples longer than the model's positions or with nothing to score (a one-token text, a prompt or
a choice the tokenizer drops), prompt templates that format to something else than a field (or hold the answer),
adapters whose tensors' rank is not their config's, objective names that are not folders of their own; a NaN base
weight is refused as the base loads. tests/test_input_checks.py holds the
warnings (test examples shared with validation) and what the table cannot express.
"""

from __future__ import annotations

import json
import shutil

from pathlib import Path

from safetensors.torch import load_file, save_file
from tokenizers import normalizers

from error_harness import Case, Workspace, cli, search
from evox_merge.util.errors import MergeInputError, TaskFormatError
from evox_merge.zoo.char_tokenizer import build_char_tokenizer

LONG = "ab" * 150  # 300 characters: 300+ tokens of the character tokenizer, past the tiny base's 256 positions
ZERO_WIDTH = "\u200b"  # a zero-width space: text for JSON, nothing for a tokenizer that drops format characters


def _duplicate_config_key(ws: Workspace) -> None:
    path = ws.write_config()
    path.write_text(path.read_text() + "batch_size: 4\n")
    cli("search", path, "--quiet")


def _duplicate_task_spec_key(ws: Workspace) -> None:
    path = ws.tasks_file()
    path.write_text(path.read_text().replace("  name: copy\n", "  name: copy\n  max_new_tokens: 4\n", 1))
    search(ws, tasks="data/tasks.yaml")


def _test_file_copy(ws: Workspace) -> None:
    shutil.copy(ws.root / "data" / "copy_validation.jsonl", ws.root / "data" / "copy_copy.jsonl")
    search(ws, tasks=[ws.task("copy", test_path="data/copy_copy.jsonl"), ws.task("text")])


def _edit_adapter_config(ws: Workspace, expert: str, **changes) -> None:
    path = ws.root / expert / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _duplicate_r(ws: Workspace, expert: str) -> None:
    """The adapter's config with a second, different `r` at the end (JSON readers keep the later one)."""
    path = ws.root / expert / "adapter_config.json"
    text = path.read_text().rstrip()
    path.write_text(text[:-1].rstrip() + ', "r": 99}')


def _poison_base(ws: Workspace) -> None:
    path = ws.root / "base" / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.1.self_attn.o_proj.weight"][2, 3] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})


def dropping_tokenizer(folder: Path) -> Path:
    """The tiny base's character tokenizer (same vocabulary) with BERT's normaliser, which drops control and format
    characters such as `ZERO_WIDTH`: a non-empty string of them tokenises to nothing."""
    tokenizer = build_char_tokenizer()
    tokenizer.backend_tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=False, strip_accents=False, lowercase=False)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_t5(folder: Path) -> Path:
    """A random tiny T5 (encoder-decoder) model folder with `dropping_tokenizer` (no EOS appended to prompts)."""
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = build_char_tokenizer()
    config = T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                      decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    return dropping_tokenizer(folder)


def _dropped(ws: Workspace, name: str, record: dict, split: str = "validation") -> None:
    """`search` with `dropping_tokenizer` after one more line, `record`, in task `name`'s file."""
    dropping_tokenizer(ws.root / "dropping_tokenizer")
    ws.line(name, json.dumps(record), split=split)
    search(ws, tokenizer="dropping_tokenizer")


def _t5_evaluate(ws: Workspace, name: str, record: dict) -> None:
    """`evaluate` of `tiny_t5` after one more line, `record`, in task `name`'s validation file."""
    ws.line(name, json.dumps(record))
    cli("evaluate", "--model", tiny_t5(ws.root / "t5"), "--tasks", ws.tasks_file())


def _evaluate(ws: Workspace, *flags: str) -> None:
    cli("evaluate", "--model", ws.root / "base", "--tasks", ws.tasks_file(), *flags)


def _pareto(ws: Workspace, names: list[str], groups: list[list[str]] | None = None) -> None:
    """A pareto search whose tasks (copies of the three workspace tasks, cycled) are named `names`."""
    kinds = ["copy", "text", "choice"]
    tasks = [{**ws.task(kinds[i % 3]), "name": name} for i, name in enumerate(names)]
    search(ws, tasks=tasks, algorithm={"name": "nsga2", "pop_size": 4},
           objectives={"kind": "pareto", **({"groups": groups} if groups else {})})


def _apply(ws: Workspace, *experts: str) -> None:
    cli("apply", "--base", ws.root / "base", "--experts", *(ws.root / e for e in experts), "--coefficients",
        ",".join(["0.5"] * len(experts)), "--out", ws.root / "merged")


def _zero_lora_b(ws: Workspace, expert: str) -> None:
    ws.edit_tensors(expert, lambda tensors: [tensors[key].zero_() for key in tensors if "lora_B" in key])


CASES = [
    # Duplicate keys in YAML: the later value used to win without a word.
    Case("yaml_duplicate_key", "`batch_size` given twice in the search config", _duplicate_config_key,
         MergeInputError, r"search\.yaml:\d+: duplicate key 'batch_size' \(first given at line \d+\); YAML would "
         r"keep only the later value"),
    Case("yaml_duplicate_key_task_file", "`max_new_tokens` given twice in a task in a task spec file (`tasks:` a "
         "path)", _duplicate_task_spec_key, MergeInputError,
         r"tasks: .*data/tasks\.yaml:\d+: duplicate key 'max_new_tokens' \(first given at line \d+\)"),
    # The test split must be held out.
    Case("test_path_is_path", "`test_path` equal to `path`",
         lambda ws: search(ws, tasks=[ws.task("copy", test_path="data/copy_validation.jsonl")]), MergeInputError,
         r"tasks: task 'copy': test_path .*copy_validation\.jsonl is the same file as path; the test split must "
         r"hold examples that never chose anything"),
    Case("test_file_copy_of_validation", "a `test_path` file that is a copy of the validation file",
         _test_file_copy, MergeInputError,
         r"tasks\.copy\.test_path: every one of the 12 test examples of .*copy_copy\.jsonl is also in the "
         r"validation file .*copy_validation\.jsonl \(same prompt\)"),
    # Examples longer than the base's positions (the tokenizer may load, the weights must not).
    Case("prompt_past_positions", "a generation prompt of 300 characters (the base has 256 positions)",
         lambda ws: (ws.line("copy", json.dumps({"prompt": LONG, "answer": "x"})), search(ws)), MergeInputError,
         r"task 'copy': .*copy_validation\.jsonl:13: prompt \(30\d tokens\) \+ max_new_tokens \(8\) = 3\d\d tokens, "
         r"more than the 256 positions of the model \(.*base/config\.json max_position_embeddings\)"),
    Case("choice_past_positions", "a multiple-choice test line whose prompt plus longest choice passes 256 tokens",
         lambda ws: (ws.line("choice", json.dumps({"prompt": "q", "choices": ["a", LONG], "answer": 0}),
                             split="test"), search(ws)), MergeInputError,
         r"task 'choice': .*choice_test\.jsonl:13: prompt \(\d tokens?\) \+ its longest choice \(300 tokens\) = 30\d "
         r"tokens, more than the 256 positions"),
    Case("evaluate_text_past_positions", "`evaluate` on a language-modelling text of 300 characters",
         lambda ws: (ws.line("text", json.dumps({"text": LONG})), _evaluate(ws)), MergeInputError,
         r"task 'text': .*text_validation\.jsonl:13: text \(30\d tokens\) = 30\d tokens, more than the 256 positions"),
    # Examples with nothing to score: refused with the tokenizer, before the weights (were 'row N' after them).
    Case("text_one_token", "a language-modelling text of one character (one token: nothing to score after it)",
         lambda ws: (ws.line("text", json.dumps({"text": "a"})), search(ws)), TaskFormatError,
         r"task 'text': .*text_validation\.jsonl:13: the text tokenises to 1 token; a language-modelling text needs "
         r"at least 2 \(the first is the context the others are scored after\) unless the task's 'prefix' gives the "
         r"context"),
    Case("evaluate_text_one_token", "`evaluate --split test` on a language-modelling test text of one character",
         lambda ws: (ws.line("text", json.dumps({"text": "."}), split="test"), _evaluate(ws, "--split", "test")),
         TaskFormatError, r"task 'text': .*text_test\.jsonl:13: the text tokenises to 1 token"),
    Case("choice_tokenises_to_nothing", "a choice of zero-width spaces, which the tokenizer (`tokenizer:`, BERT's "
         "normaliser) drops", lambda ws: _dropped(ws, "choice", {"prompt": "q", "choices": ["a", ZERO_WIDTH * 2],
                                                                  "answer": 0}),
         TaskFormatError, r"task 'choice': .*choice_validation\.jsonl:13: choices\[1\] '\\u200b\\u200b' tokenises to "
         r"nothing; expected at least one token to score"),
    Case("choice_prompt_tokenises_to_nothing", "a multiple-choice test prompt of a zero-width space, which the "
         "tokenizer drops", lambda ws: _dropped(ws, "choice", {"prompt": ZERO_WIDTH, "choices": ["a", "b"],
                                                                "answer": 0}, split="test"),
         TaskFormatError, r"task 'choice': .*choice_test\.jsonl:13: the prompt '\\u200b' tokenises to nothing; "
         r"expected at least one token for the model to read before the choices are scored"),
    Case("generation_prompt_tokenises_to_nothing", "a generation prompt of a zero-width space, which the tokenizer "
         "drops", lambda ws: _dropped(ws, "copy", {"prompt": ZERO_WIDTH, "answer": "x"}), TaskFormatError,
         r"task 'copy': .*copy_validation\.jsonl:13: the prompt '\\u200b' tokenises to nothing; expected at least "
         r"one token for the model to read before it generates"),
    Case("t5_choice_tokenises_to_nothing", "`evaluate` of an encoder-decoder (T5) model on a choice its tokenizer "
         "drops", lambda ws: _t5_evaluate(ws, "choice", {"prompt": "q", "choices": [ZERO_WIDTH, "b"], "answer": 1}),
         TaskFormatError, r"task 'choice': .*choice_validation\.jsonl:13: choices\[0\] '\\u200b' tokenises to "
         r"nothing"),
    Case("t5_generation_prompt_tokenises_to_nothing", "`evaluate` of a T5 model on a generation prompt its "
         "tokenizer drops", lambda ws: _t5_evaluate(ws, "copy", {"prompt": ZERO_WIDTH, "answer": "x"}),
         TaskFormatError, r"task 'copy': .*copy_validation\.jsonl:13: the prompt '\\u200b' tokenises to nothing"),
    Case("t5_text_tokenises_to_nothing", "`evaluate` of a T5 model on a language-modelling text its tokenizer "
         "drops", lambda ws: _t5_evaluate(ws, "text", {"text": ZERO_WIDTH}), TaskFormatError,
         r"task 'text': .*text_validation\.jsonl:13: the text tokenises to nothing; expected at least one token to "
         r"score"),
    # Prompt templates that format to something else than the field, or hand over the answer.
    Case("template_attribute", "`prompt_template: \"{prompt.upper}\"` (every prompt a method's repr)",
         lambda ws: search(ws, tasks=[ws.task("copy", prompt_template="{prompt.upper}")]), MergeInputError,
         r"task 'copy': prompt_template '\{prompt\.upper\}' uses \{prompt\.upper\}, which formats to something else "
         r"than the field 'prompt' .*use plain record field names such as '\{prompt\}'"),
    Case("template_index", "`prompt_template: \"Q: {prompt[0]}\"`",
         lambda ws: search(ws, tasks=[ws.task("copy", prompt_template="Q: {prompt[0]}")]), MergeInputError,
         r"uses \{prompt\[0\]\}, which formats to something else than the field 'prompt' \(attribute access, "
         r"indexing, conversions and format specs are not allowed\)"),
    Case("template_conversion_and_spec", "`prompt_template: \"{prompt!r:>40}\"`",
         lambda ws: search(ws, tasks=[ws.task("copy", prompt_template="{prompt!r:>40}")]), MergeInputError,
         r"uses \{prompt!r:>40\}, which formats to something else than the field 'prompt'"),
    Case("template_answer_generation", "`prompt_template: \"{prompt} {answer}\"` in a generation task",
         lambda ws: search(ws, tasks=[ws.task("copy", prompt_template="{prompt} {answer}")]), MergeInputError,
         r"task 'copy': prompt_template '\{prompt\} \{answer\}' uses the answer field \{answer\}: every prompt "
         r"would hold the answer it is scored on"),
    Case("template_answer_choice", "`prompt_template: \"{prompt} (answer {answer})\"` in a multiple-choice task",
         lambda ws: search(ws, tasks=[ws.task("choice", prompt_template="{prompt} (answer {answer})")]),
         MergeInputError, r"task 'choice': .*uses the answer field \{answer\}"),
    Case("template_field_is_a_list", "`prompt_template: \"{prompt} {choices}\"` (a list's Python repr)",
         lambda ws: search(ws, tasks=[ws.task("choice", prompt_template="{prompt} {choices}")]), MergeInputError,
         r"choice_validation\.jsonl:1: prompt_template .* uses field 'choices', which holds \[.*\]; a template field "
         r"must hold text or a number"),
    Case("template_on_language_modelling", "`prompt_template` on a language-modelling task (ignored before)",
         lambda ws: search(ws, tasks=[ws.task("text", prompt_template="Q: {text}")]), MergeInputError,
         r"task 'text': prompt_template 'Q: \{text\}' is not used by a language_modeling task"),
    # Adapters whose tensors' rank is not the config's (search scaled them silently, evaluate refused late).
    Case("adapter_rank_not_r", "an expert's `adapter_config.json` with `r: 8` for tensors of rank 4",
         lambda ws: (_edit_adapter_config(ws, "expert_0", r=8), search(ws)), MergeInputError,
         r"expert_0/adapter_model\.safetensors: tensor 'base_model\.model\..*\.lora_A\.weight' has shape \(4, 64\) "
         r"\(rank 4\) but .*expert_0/adapter_config\.json gives this module r = 8"),
    Case("evaluate_adapter_rank_pattern", "`evaluate --adapter` whose `rank_pattern` gives `q_proj` rank 2 for "
         "tensors of rank 4",
         lambda ws: (_edit_adapter_config(ws, "expert_0", rank_pattern={"q_proj": 2}),
                     _evaluate(ws, "--adapter", ws.root / "expert_0")), MergeInputError,
         r"tensor 'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight' has shape \(4, 64\) "
         r"\(rank 4\) but .*gives this module rank_pattern\['q_proj'\] = 2"),
    Case("adapter_config_duplicate_key", "an expert's `adapter_config.json` that gives `r` twice",
         lambda ws: (_duplicate_r(ws, "expert_1"), search(ws)), MergeInputError,
         r"invalid search config: experts\[1\]: .*expert_1/adapter_config\.json gives the key 'r' twice in one "
         r"object; JSON readers would keep only the later value"),
    # The same expert twice: refused from the config before the imports (after them, from the loaded set, before).
    Case("expert_listed_twice", "`experts: [expert_0, expert_1, expert_0]`",
         lambda ws: search(ws, experts=["expert_0", "expert_1", "expert_0"]), MergeInputError,
         r"invalid search config: experts\[2\]: .*expert_0 is experts\[0\] again \(the same folder\); list each "
         r"expert once"),
    Case("expert_copy_listed", "an expert and a copy of its folder under another name",
         lambda ws: (shutil.copytree(ws.root / "expert_1", ws.root / "copy_of_1"),
                     search(ws, experts=["expert_0", "expert_1", "copy_of_1"])), MergeInputError,
         r"experts\[2\]: .*copy_of_1 holds the same weights \(adapter_model\.safetensors, byte for byte\) and "
         r"scaling as experts\[1\] \(.*expert_1\): the same expert twice"),
    Case("apply_expert_listed_twice", "`apply --experts A B A`",
         lambda ws: _apply(ws, "expert_0", "expert_1", "expert_0"), MergeInputError,
         r"^experts\[2\]: .*expert_0 is experts\[0\] again \(the same folder\)"),
    Case("apply_expert_untrained", "`apply --experts` with an adapter whose every `lora_B` is zero",
         lambda ws: (_zero_lora_b(ws, "expert_1"), _apply(ws, "expert_0", "expert_1")), MergeInputError,
         r"^experts\[1\]: .*expert_1/adapter_model\.safetensors: every module's lora_B \(or lora_A\) is all zeros"),
    Case("apply_adapter_rank_not_r", "`apply --experts` with an adapter whose config gives `r: 8` for rank-4 tensors",
         lambda ws: (_edit_adapter_config(ws, "expert_0", r=8), _apply(ws, "expert_0", "expert_1")),
         MergeInputError, r"^experts\[0\]: .*expert_0/adapter_model\.safetensors: tensor .* \(rank 4\) but .* r = 8"),
    Case("evaluate_adapter_duplicate_key", "`evaluate --adapter` whose `adapter_config.json` gives `r` twice",
         lambda ws: (_duplicate_r(ws, "expert_1"), _evaluate(ws, "--adapter", ws.root / "expert_1")),
         MergeInputError, r"^--adapter: .*expert_1/adapter_config\.json gives the key 'r' twice"),
    # A folder where a task spec file is expected: was "does not exist".
    Case("tasks_is_directory", "`tasks: data` (a folder) in a config",
         lambda ws: search(ws, tasks="data"), MergeInputError,
         r"invalid search config: tasks: .*data is a directory; expected a task spec file: YAML or JSON holding a "
         r"list of task specs \(name, type, path, \.\.\.\) or a mapping whose 'tasks' key holds one"),
    Case("evaluate_tasks_is_directory", "`evaluate --tasks data` (a folder)",
         lambda ws: cli("evaluate", "--model", ws.root / "base", "--tasks", ws.root / "data"), MergeInputError,
         r"^--tasks: .*data is a directory; expected a task spec file"),
    # Pareto objective names that are not folders of their own under specialists/.
    Case("objectives_folders_collide", "tasks `a/b` and `a_b` under `objectives: pareto`",
         lambda ws: _pareto(ws, ["a/b", "a_b"]), MergeInputError,
         r"objectives: objectives 'a/b' and 'a_b' would both write specialists/a_b/; objective names .* use "
         r"letters, digits and \. _ \+ -"),
    Case("objectives_folder_dotdot", "a task named `..` under `objectives: pareto`",
         lambda ws: _pareto(ws, ["..", "b"]), MergeInputError,
         r"objectives: objective '\.\.' would write specialists/\.\./, which is not a folder of its own; .*not "
         r"'\.' or '\.\.'"),
    Case("objectives_folder_dot", "a task named `.` under `objectives: pareto`",
         lambda ws: _pareto(ws, [".", "b"]), MergeInputError,
         r"objectives: objective '\.' would write specialists/\./"),
    Case("objectives_names_collide", "groups `[[a, b], [a+b]]`: two objectives named `a+b`",
         lambda ws: _pareto(ws, ["a", "b", "a+b"], [["a", "b"], ["a+b"]]), MergeInputError,
         r"objectives: two objectives are both named 'a\+b'"),
    # A NaN base weight: refused as the base loads, naming the file and the tensor.
    Case("base_weight_nan", "NaN in a base weight (`search`)", lambda ws: (_poison_base(ws), search(ws)),
         MergeInputError, r"base/model\.safetensors: tensor 'model\.layers\.1\.self_attn\.o_proj\.weight' holds 1 "
         r"NaN/inf value\(s\) as loaded in torch\.float32", before_model=False),
    Case("evaluate_base_weight_nan", "NaN in the model's weight (`evaluate`)", lambda ws: (_poison_base(ws),
                                                                                        _evaluate(ws)),
         MergeInputError, r"base/model\.safetensors: tensor 'model\.layers\.1\.self_attn\.o_proj\.weight' holds 1 "
         r"NaN/inf value\(s\)", before_model=False),
]
