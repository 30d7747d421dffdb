"""The evaluator's own parts: rows, prompts, results.json and the report (serving is tested in tests/serving)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from kubetune.api.evaluation import CandidatePrompt, EvalDataset
from kubetune.serving.evaluate import (
    PlanError,
    apply_split,
    few_shot_examples,
    fill,
    percentile,
    read_dataset,
    render_prompts,
)
from kubetune.serving.report import format_table, metric_names, worst_examples, write_report


def write_rows(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"ref": f"sentence {i}", "mr": f"inform(name[G{i}])"}) + "\n"
                            for i in range(n)))
    return path


@pytest.mark.parametrize(("split", "expected"), [
    (None, list(range(10))), ("[:3]", [0, 1, 2]), ("[-2:]", [8, 9]), ("[80%:]", [8, 9]), ("[2:4]", [2, 3]),
    ("[:50%]", [0, 1, 2, 3, 4]),
])
def test_split_slices_rows_like_hf_datasets(split, expected):
    assert apply_split(list(range(10)), split) == expected


def test_dataset_split_then_limit(tmp_path):
    ds = EvalDataset(uri=str(write_rows(tmp_path / "test.jsonl", 10)), reference="{mr}", split="[5:]", limit=2)
    rows = read_dataset(ds, tmp_path)
    assert [r["ref"] for r in rows] == ["sentence 5", "sentence 6"]


def test_missing_field_names_file_row_and_template():
    with pytest.raises(PlanError, match=r"test.jsonl row 3: missing field 'answer' used by spec.dataset.reference"):
        fill("{answer}", {"ref": "x", "_row": "3", "_source": "test.jsonl"}, "spec.dataset.reference")


def test_unreadable_dataset_names_the_field(tmp_path):
    with pytest.raises(PlanError, match="spec.dataset"):
        read_dataset(EvalDataset(uri=str(tmp_path / "absent.jsonl"), reference="{mr}"), tmp_path)


def test_few_shot_examples_are_one_seeded_draw_ending_with_the_answer(tmp_path):
    src = write_rows(tmp_path / "train.jsonl", 20)
    prompt = CandidatePrompt.model_validate({"template": "Sentence: {ref}\nMR:", "answer": " {mr}",
                                             "fewShot": {"k": 3, "seed": 1, "source": {"uri": str(src)}}})
    first = few_shot_examples(prompt, "{mr}", ["\n"], tmp_path, "p")
    assert first == few_shot_examples(prompt, "{mr}", ["\n"], tmp_path, "p")
    assert len(first) == 3 and all(e.startswith("Sentence: sentence ") and "\nMR: inform(" in e for e in first)


def test_few_shot_answers_end_with_a_special_stop_token(tmp_path):
    src = write_rows(tmp_path / "train.jsonl", 5)
    prompt = CandidatePrompt.model_validate({"template": "<Q>{ref}<A>", "fewShot": {"k": 1, "source": {"uri": str(src)}}})
    (example,) = few_shot_examples(prompt, "{mr}", ["<END>"], tmp_path, "p")
    assert example.endswith(")<END>")


def test_prompt_is_instruction_then_examples_then_question():
    prompt = CandidatePrompt.model_validate({"instruction": "Do it.", "template": "Q: {ref}\nA:"})
    (text,) = render_prompts(prompt, ["Q: a\nA: 1", "Q: b\nA: 2"], [{"ref": "c"}], "p")
    assert text == "Do it.\n\nQ: a\nA: 1\n\nQ: b\nA: 2\n\nQ: c\nA:"


def test_prompt_without_instruction_or_examples_is_the_template_alone():
    prompt = CandidatePrompt.model_validate({"template": "<START_Q>{ref}<END_Q><START_A>"})
    assert render_prompts(prompt, [], [{"ref": "x"}], "p") == ["<START_Q>x<END_Q><START_A>"]


def test_percentile_is_nearest_rank():
    assert percentile([1.0, 2.0, 3.0, 4.0], 95) == 4.0
    assert percentile([float(i) for i in range(1, 101)], 95) == 95.0


def results_fixture() -> dict:
    examples = []
    for i in range(25):
        examples.append({"index": i, "row": i + 1, "input": {"ref": f"s{i}"}, "reference": f"inform(name[G{i}])",
                         "predictions": {
                             "fine-tuned": {"text": f"inform(name[G{i}])", "error": None, "score": 1.0 if i % 5 else 0.0,
                                            "dropped": None},
                             "base": {"text": "oops", "error": None if i else "timeout", "score": 0.0, "dropped": None}}})
    return {
        "evalJob": {"name": "e", "namespace": "default"}, "scorer": "viggo", "primaryMetric": "exactMatch",
        "seconds": 3.2, "rows": 25,
        "candidates": [
            {"name": "fine-tuned", "model": "runs/ft/best", "metrics": {"functionAccuracy": 1.0, "exactMatch": 0.8},
             "examples": 25, "dropped": 0, "errors": 0, "latency": {"meanSeconds": 0.5, "p95Seconds": 0.9},
             "promptTokensPerRequest": 30.0, "completionTokensPerRequest": 12.0, "prompt": "<Q>s0<A>", "notes": []},
            {"name": "base", "model": "smollm2", "metrics": {"functionAccuracy": 0.1, "exactMatch": 0.0},
             "examples": 25, "dropped": 0, "errors": 1, "latency": {"meanSeconds": 1.5, "p95Seconds": 2.0},
             "promptTokensPerRequest": 400.0, "completionTokensPerRequest": 20.0, "prompt": "Do it", "notes": ["n"]},
        ],
        "gate": {"passed": True, "metric": "exactMatch", "message": "gate passed: fine-tuned exactMatch = 0.8",
                 "checks": []},
        "learningCurve": [{"epoch": 1, "trainLoss": 2.0, "valLoss": 1.9, "valPerplexity": 6.7},
                          {"epoch": 2, "trainLoss": 1.0, "valLoss": 1.2, "valPerplexity": 3.3}],
        "baseValPerplexity": 120.0,
        "examples": examples,
    }


def test_headline_metric_comes_first():
    assert metric_names(results_fixture()) == ["exactMatch", "functionAccuracy"]


def test_worst_examples_are_the_lowest_scores_first():
    worst = worst_examples(results_fixture(), "fine-tuned", n=20)
    assert [e.index for e in worst] == [0, 5, 10, 15, 20]  # the only ones not fully right


def test_worst_examples_put_failed_requests_before_wrong_answers():
    worst = worst_examples(results_fixture(), "base", n=3)
    assert [e.index for e in worst] == [0, 1, 2]  # row 0's request failed; all score 0


def test_token_counts_print_as_plain_numbers_not_exponents():
    results = results_fixture()
    results["candidates"][1]["promptTokensPerRequest"] = 1234.5
    assert "1,234" in format_table(results) and "e+03" not in format_table(results)


def test_a_learning_curve_left_from_an_earlier_report_is_not_inlined(tmp_path):
    (tmp_path / "learning_curve.png").write_bytes(b"stale")
    results = results_fixture()
    results["learningCurve"] = []
    page = write_report(results, tmp_path).read_text()
    assert "alt='learning_curve.png'" not in page and "alt='metrics.png'" in page


def test_table_shows_every_candidate_metric_cost_and_the_gate():
    table = format_table(results_fixture())
    assert "fine-tuned" in table and "80.0%" in table and "400" in table and "PASSED" in table
    assert "note: base: n" in table


def test_report_is_one_self_contained_page_with_plots(tmp_path):
    path = write_report(results_fixture(), tmp_path)
    page = path.read_text()
    for plot in ("metrics.png", "tokens.png", "latency.png", "learning_curve.png"):
        assert (tmp_path / plot).stat().st_size > 1000
        assert f"alt='{plot}' src='data:image/png;base64," in page
    assert "Worst 5 examples: fine-tuned" in page and "Worst 20 examples: base" in page
    assert "request failed: timeout" in page
    assert "<script" not in page and "http" not in page.split("<body>")[1]  # nothing fetched from elsewhere
