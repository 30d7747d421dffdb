"""One template-filling function for the trainer and the evaluator (kubetune.contract.templates).

A template the API accepts fills the same way in both: `{0}` is the field named "0" (it crashed the
evaluator's `str.format_map`, which took it for a positional index), `{a-b}` the field "a-b", `{{`/`}}` are
literal braces. A field a row lacks is an error naming the field and the row, never the row's values. What
the API refuses at apply time (`{}`, `{0.x}`, `{0[1]}`, `{x!r}`, `{x:>4}`) it refuses for both.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from kubetune.api.evaluation import CandidatePrompt, EvalDataset
from kubetune.api.finetunejob import PromptTemplate
from kubetune.contract import templates
from kubetune.contract.templates import MissingFields, fill_template, fill_templates, placeholders
from kubetune.serving import evaluate
from kubetune.serving.evaluate import PlanError, read_dataset, render_prompts
from kubetune.trainer import data
from kubetune.trainer.data import DataError, Row, read_rows, render

CANARY = "CANARY-77e1c0d9a3"


def trainer_fill(prompt: str, fields: dict[str, str]) -> str:
    template = PromptTemplate(prompt=prompt, completion="{mr}")  # validated as when the job is applied
    filled, completion = render(Row("train.jsonl", 1, fields=fields | {"mr": "M"}), template, tokenizer=None)
    assert completion == "M"
    return filled


def evaluator_fill(template: str, fields: dict[str, str]) -> str:
    prompt = CandidatePrompt.model_validate({"template": template})  # validated as when the job is applied
    (filled,) = render_prompts(prompt, [], [fields | {"_row": "1", "_source": "test.jsonl"}], "p")
    return filled


def test_the_trainer_and_the_evaluator_call_the_one_function() -> None:
    assert data.fill_templates is templates.fill_templates
    assert evaluate.fill_template is templates.fill_template


@pytest.mark.parametrize(("template", "fields", "filled"), [
    ("{0}", {"0": "zero"}, "zero"),
    ("Q: {0} and {1}", {"0": "a", "1": "b"}, "Q: a and b"),
    ("{a-b}/{_c}", {"a-b": "x", "_c": "y"}, "x/y"),
    ("{{literal}} {x} }}", {"x": "v"}, "{literal} v }"),
    ("{x}{x}", {"x": "{y}"}, "{y}{y}"),  # a value is never a template itself
], ids=["positional-looking", "two-positional-looking", "dash-underscore", "escaped-braces", "no-reformatting"])
def test_a_template_fills_the_same_in_the_trainer_and_the_evaluator(template: str, fields: dict[str, str],
                                                                    filled: str) -> None:
    assert fill_template(template, fields) == filled
    assert trainer_fill(template, fields) == filled
    assert evaluator_fill(template, fields) == filled


def test_a_missing_field_names_field_and_row_and_no_value_in_both() -> None:
    fields = {"ref": CANARY, "mr": "M"}
    with pytest.raises(DataError) as trained:
        render(Row("train.jsonl", 7, fields=fields), PromptTemplate(prompt="{0}: {ref}", completion="{mr}"),
               tokenizer=None)
    assert str(trained.value) == "train.jsonl row 7: missing field '0' (template placeholders: 0, ref, mr)"
    with pytest.raises(PlanError) as evaluated:
        evaluate.fill("{0}: {ref}", fields | {"_row": "7", "_source": "test.jsonl"}, "spec.candidates[0].prompt.template")
    assert str(evaluated.value) == "test.jsonl row 7: missing field '0' used by spec.candidates[0].prompt.template"
    with pytest.raises(MissingFields) as both:
        fill_templates(("{a}{b}", "{c}"), {"b": CANARY})
    assert (both.value.missing, both.value.placeholders) == (["a", "c"], ["a", "b", "c"])
    assert CANARY not in str(trained.value) + str(evaluated.value) + str(both.value)


def test_every_template_is_checked_before_any_is_filled() -> None:
    with pytest.raises(MissingFields, match=r"^missing field 'mr' \(template placeholders: ref, mr\)$"):
        fill_templates(("{ref}", "{mr}"), {"ref": "r"})


@pytest.mark.parametrize("template", ["{}", "{0.real}", "{0[1]}", "{x!r}", "{x:>4}", "{", "x}"])
def test_what_cannot_be_a_field_name_is_refused_at_apply_time_in_both(template: str) -> None:
    with pytest.raises(ValidationError, match="placeholder"):
        PromptTemplate(prompt=template, completion="{mr}")
    with pytest.raises(ValidationError, match="placeholder"):
        CandidatePrompt.model_validate({"template": template})
    with pytest.raises(ValidationError, match="placeholder"):
        EvalDataset(uri="test.jsonl", reference=template)
    with pytest.raises(ValueError, match="placeholder"):
        fill_template(template, {"x": "v"})  # and by the function itself, for a template never applied


def test_placeholders_are_distinct_in_order_of_first_use() -> None:
    assert placeholders("{b}{a}", "{a}{c}{b}") == ["b", "a", "c"]


def test_a_csv_column_named_0_is_read_and_filled_by_both(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("0,mr\nfirst,M1\nsecond,M2\n")
    rows = read_rows(path, "csv", None)
    template = PromptTemplate(prompt="<Q>{0}<A>", completion="{mr}")
    assert [render(r, template, tokenizer=None) for r in rows] == [("<Q>first<A>", "M1"), ("<Q>second<A>", "M2")]
    evaluated = read_dataset(EvalDataset(uri=str(path), format="csv", reference="{mr}"), tmp_path)
    prompt = CandidatePrompt.model_validate({"template": "<Q>{0}<A>"})
    assert render_prompts(prompt, [], evaluated, "p") == ["<Q>first<A>", "<Q>second<A>"]
