import json

import pytest

from evox_merge.util.errors import TaskFormatError
from evox_merge.tasks import TaskSpec, load_task_specs, read_task


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def mc_spec(path):
    return TaskSpec(name="mc", type="multiple_choice", path=str(path))


def test_multiple_choice_answer_by_string_is_normalised_to_index(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [json.dumps({"prompt": "q", "choices": ["a", "b"], "answer": "b"})])
    task = read_task(mc_spec(path))
    assert task.records == [{"prompt": "q", "choices": ["a", "b"], "answer": 1}]


def test_prompt_template_uses_record_fields(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [json.dumps({"question": "2+2", "answer": "4"})])
    spec = TaskSpec(name="g", type="generation", path=str(path), prompt_template="Q: {question}\nA:")
    assert read_task(spec).records[0]["prompt"] == "Q: 2+2\nA:"


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "q", "choices": ["a", "b"], "answer": 0}', "{not json"], r"t\.jsonl:2: malformed JSON"),
        (['{"prompt": "q", "choices": ["a", "b"]}'], r"t\.jsonl:1: missing field 'answer'"),
        (['{"prompt": "q", "choices": ["a", "b"], "answer": "c"}'], r"t\.jsonl:1: answer 'c' is not one of"),
        (['{"prompt": "q", "choices": ["a", "b"], "answer": 2}'], r"t\.jsonl:1: answer index 2 is outside"),
        (['{"prompt": "q", "choices": ["a"], "answer": 0}'], r"t\.jsonl:1: field 'choices'"),
        (["[1, 2]"], r"t\.jsonl:1: expected a JSON object"),
        ([], r"holds no examples"),
    ],
)
def test_bad_task_lines_name_file_and_line(tmp_path, lines, message):
    path = write_lines(tmp_path / "t.jsonl", lines)
    with pytest.raises(TaskFormatError, match=message):
        read_task(mc_spec(path))


def test_missing_task_file(tmp_path):
    with pytest.raises(TaskFormatError, match="does not exist"):
        read_task(mc_spec(tmp_path / "nope.jsonl"))


def test_template_field_missing_is_reported_with_line(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", ['{"prompt": "p", "answer": "x"}'])
    spec = TaskSpec(name="g", type="generation", path=str(path), prompt_template="{question}")
    with pytest.raises(TaskFormatError, match=r"t\.jsonl:1: prompt_template .* needs field 'question'"):
        read_task(spec)


def test_spec_validation():
    with pytest.raises(TaskFormatError, match="field 'type'"):
        TaskSpec(name="x", type="ranking", path="x")
    with pytest.raises(TaskFormatError, match="metric 'exact_match' does not apply"):
        TaskSpec(name="x", type="multiple_choice", path="x", metric="exact_match")
    assert TaskSpec(name="x", type="language_modeling", path="x").metric == "neg_nll"


def test_spec_file_resolves_relative_paths_and_rejects_unknown_fields(tmp_path):
    (tmp_path / "tasks.yaml").write_text("- {name: a, type: generation, path: a.jsonl, test_path: a_test.jsonl}\n")
    (spec,) = load_task_specs(tmp_path / "tasks.yaml")
    assert spec.path == str(tmp_path / "a.jsonl")
    assert spec.with_split("test").path == str(tmp_path / "a_test.jsonl")
    (tmp_path / "bad.yaml").write_text("- {name: a, type: generation, path: a.jsonl, metrc: x}\n")
    with pytest.raises(TaskFormatError, match=r"unknown field\(s\) \['metrc'\]"):
        load_task_specs(tmp_path / "bad.yaml")


def test_limit_keeps_the_first_examples_but_checks_every_line(tmp_path):
    lines = [json.dumps({"prompt": f"q{i}", "answer": "a"}) for i in range(5)] + ["{broken"]
    path = write_lines(tmp_path / "t.jsonl", lines)
    spec = TaskSpec(name="g", type="generation", path=str(path))
    with pytest.raises(TaskFormatError, match=r"t\.jsonl:6: malformed JSON"):
        read_task(spec, limit=2)
    path.write_text("".join(line + "\n" for line in lines[:5]))
    assert [r["prompt"] for r in read_task(spec, limit=2).records] == ["q0", "q1"]
