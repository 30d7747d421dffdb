"""The evaluation plan: how an EvalJob's candidates become URLs, prompts and stop sequences; the gate."""

from __future__ import annotations

import pytest

from factories import ftj
from kubetune.api.evaljob import EvalJob
from kubetune.contract.evalplan import (
    api_key_env,
    completion_prefix,
    evaljob_for,
    evaljob_name,
    fine_tuned_prompt,
    judge_gate,
    plan,
    service_name,
)

BASELINE = {"instruction": "Give the meaning representation.", "template": "Sentence: {ref}\nMR:",
            "answer": " {mr}", "fewShot": {"k": 2, "source": {"uri": "s3://b/train.jsonl"}}}


def evj(**spec) -> EvalJob:
    body = {"metadata": {"name": "viggo-eval", "namespace": "team-a"}, "spec": {
        "candidates": [
            {"name": "fine-tuned", "model": {"fineTuneJobRef": {"name": "viggo"}}},
            {"name": "base", "model": {"name": "meta-llama/Llama-2-7b-hf"}, "prompt": BASELINE,
             "generation": {"stop": ["\n"]}},
            {"name": "gpt-4", "model": {"endpoint": {"url": "https://api.openai.com/v1/", "model": "gpt-4",
                                                     "apiKeySecretRef": {"name": "openai", "key": "key"}}},
             "prompt": {**BASELINE, "chat": True}},
        ],
        "dataset": {"uri": "s3://b/test.jsonl", "reference": "{mr}"},
        "scorer": {"name": "viggo"},
        "output": {"uri": "s3://b/eval"},
        **spec}}
    return EvalJob.from_body(body)


def viggo_ftj():
    return ftj(name="viggo", spec__dataset__template={
        "specialTokens": ["<START_Q>", "<END_Q>", "<START_A>", "<END_A>"],
        "prompt": "<START_Q>{ref}<END_Q>", "completion": "<START_A>{mr}", "stop": "<END_A>"})


def resolved():
    return plan(evj(), {"fine-tuned": "s3://b/viggo/best", "base": "meta-llama/Llama-2-7b-hf"},
                {"viggo": viggo_ftj()}, {"fine-tuned": "http://ft/v1", "base": "http://base/v1"})


def test_completion_prefix_is_the_literal_text_before_the_first_field():
    assert completion_prefix("<START_A>{mr}") == "<START_A>"
    assert completion_prefix("{answer}") == ""
    assert completion_prefix("Answer {{json}}: {x}") == "Answer {json}: "


def test_fine_tuned_model_is_prompted_in_its_training_format_and_stops_at_its_stop_token():
    prompt, stops = fine_tuned_prompt(viggo_ftj())
    assert prompt.template == "<START_Q>{ref}<END_Q><START_A>"
    assert stops == ["<END_A>"]


def test_fine_tuned_candidate_gets_its_jobs_prompt_stop_and_special_tokens():
    ft = resolved().candidates[0]
    assert ft.prompt.template == "<START_Q>{ref}<END_Q><START_A>"
    assert ft.generation.stop == ["<END_A>"]
    assert ft.special_tokens == ["<START_Q>", "<END_Q>", "<START_A>", "<END_A>"]
    assert (ft.served, ft.model_uri, ft.base_url, ft.model) == (True, "s3://b/viggo/best", "http://ft/v1", "fine-tuned")
    assert ft.service == "viggo-eval-fine-tuned"


def test_baseline_keeps_its_own_prompt_and_stop():
    base = resolved().candidates[1]
    assert base.prompt.instruction.startswith("Give") and base.generation.stop == ["\n"]
    assert base.special_tokens == []


def test_endpoint_candidate_is_called_not_served_and_takes_its_key_from_the_environment():
    gpt = resolved().candidates[2]
    assert (gpt.served, gpt.base_url, gpt.model, gpt.service) == (False, "https://api.openai.com/v1", "gpt-4", None)
    assert gpt.api_key_env == api_key_env("gpt-4") == "KUBETUNE_API_KEY_GPT_4"


def test_plan_round_trips_through_json():
    p = resolved()
    assert type(p).from_wire(p.to_wire()) == p


@pytest.mark.parametrize("evaljob", ["x", "viggo-llama-2-7b-eval", "a" * 63])
def test_service_names_are_short_deterministic_dns_labels(evaljob):
    name = service_name(evaljob, "base-few-shot")
    assert len(name) <= 40 and name == service_name(evaljob, "base-few-shot")
    assert name.replace("-", "").isalnum() and not name.endswith("-")


def test_long_service_names_differ_by_candidate():
    assert service_name("a" * 50, "fine-tuned") != service_name("a" * 50, "fine-tuned2")


METRICS = {"fine-tuned": {"exactMatch": 0.82, "functionAccuracy": 0.97}, "base": {"exactMatch": 0.40}}


def test_no_gate_no_verdict():
    assert judge_gate(evj().spec, METRICS) is None


def test_gate_passes_when_minimum_and_margin_hold():
    gate = judge_gate(evj(gate={"candidate": "fine-tuned", "minimum": 0.8,
                                "beats": [{"candidate": "base", "margin": 0.3}]}).spec, METRICS)
    assert gate is not None and gate.passed and gate.metric == "exactMatch"
    assert [c.passed for c in gate.checks] == [True, True]
    assert gate.checks[1].threshold == pytest.approx(0.70)


def test_gate_fails_below_minimum_and_says_by_how_much():
    gate = judge_gate(evj(gate={"candidate": "fine-tuned", "minimum": 0.9}).spec, METRICS)
    assert gate is not None and not gate.passed
    assert "exactMatch >= 0.9" in gate.message and "0.82" in gate.message


def test_gate_fails_when_the_margin_is_not_met():
    gate = judge_gate(evj(gate={"candidate": "fine-tuned", "beats": [{"candidate": "base", "margin": 0.5}]}).spec,
                      METRICS)
    assert gate is not None and not gate.passed and "base" in gate.message


def test_a_tie_does_not_beat_the_other_candidate():
    tie = {"fine-tuned": {"exactMatch": 0.5}, "base": {"exactMatch": 0.5}}
    gate = judge_gate(evj(gate={"candidate": "fine-tuned", "beats": [{"candidate": "base"}]}).spec, tie)
    assert gate is not None and not gate.passed
    assert "fine-tuned exactMatch > base exactMatch" in gate.message


def test_a_margin_met_exactly_passes_despite_float_rounding():
    scores = {"fine-tuned": {"exactMatch": 0.55}, "base": {"exactMatch": 0.5}}
    gate = judge_gate(evj(gate={"candidate": "fine-tuned", "beats": [{"candidate": "base", "margin": 0.05}]}).spec,
                      scores)
    assert gate is not None and gate.passed


def test_gate_uses_the_named_metric():
    gate = judge_gate(evj(gate={"candidate": "fine-tuned", "metric": "functionAccuracy", "minimum": 0.95}).spec,
                      METRICS)
    assert gate is not None and gate.passed and gate.metric == "functionAccuracy"


def test_gate_fails_when_the_candidate_has_no_value():
    gate = judge_gate(evj(gate={"candidate": "gpt-4", "minimum": 0.1}).spec, METRICS)
    assert gate is not None and not gate.passed and "n/a" in gate.message


def test_finetunejob_evaluation_becomes_fine_tuned_vs_base_few_shot():
    job = ftj(name="viggo", spec__evaluation={
        "dataset": {"uri": "s3://b/test.jsonl", "reference": "{mr}"}, "scorer": {"name": "viggo"},
        "baselinePrompt": {"template": "{ref} ->", "answer": " {mr}", "fewShot": {"k": 3}},
        "gate": {"candidate": "fine-tuned", "beats": [{"candidate": "base-few-shot"}]}})
    manifest = evaljob_for(job, "meta-llama/Llama-2-7b-hf")
    made = EvalJob.from_body(manifest)
    assert made.metadata.name == evaljob_name("viggo") == "viggo-eval"
    assert [c.name for c in made.spec.candidates] == ["fine-tuned", "base-few-shot"]
    assert made.spec.candidates[0].model.fine_tune_job_ref.name == "viggo"
    assert made.spec.candidates[1].model.name == "meta-llama/Llama-2-7b-hf"
    few = made.spec.candidates[1].prompt.few_shot
    assert few.source.uri == job.spec.dataset.train.uri  # few-shot examples default to the training rows
    assert made.spec.output.uri == job.spec.output.uri.rstrip("/") + "/eval"


def test_a_gated_base_model_is_served_with_the_finetunejobs_token():
    job = ftj(name="viggo", spec__baseModel={"name": "meta-llama/Llama-2-7b-hf",
                                             "tokenSecretRef": {"name": "hf", "key": "token"}},
              spec__evaluation={"dataset": {"uri": "s3://b/test.jsonl", "reference": "{mr}"},
                                "scorer": {"name": "viggo"}, "baselinePrompt": {"template": "{ref} ->"}})
    made = EvalJob.from_body(evaljob_for(job, "meta-llama/Llama-2-7b-hf"))
    token = made.spec.candidates[1].model.token_secret_ref
    assert token is not None and (token.name, token.key) == ("hf", "token")
    assert made.spec.candidates[0].model.token_secret_ref is None  # the checkpoint needs none


def test_a_base_model_directory_stays_a_uri_even_when_relative():
    job = ftj(name="demo", spec__baseModel={"uri": "runs/models/SmolLM2-135M-Instruct"}, spec__evaluation={
        "dataset": {"uri": "runs/test.jsonl", "reference": "{mr}"}, "scorer": {"name": "viggo"},
        "baselinePrompt": {"template": "{ref} ->"}})
    made = EvalJob.from_body(evaljob_for(job, "runs/models/SmolLM2-135M-Instruct"))
    assert made.spec.candidates[1].model.uri == "runs/models/SmolLM2-135M-Instruct"
    assert made.spec.candidates[1].model.name is None


def test_a_second_stage_compares_with_the_checkpoint_it_started_from():
    job = ftj(name="gsm8k", spec__baseModel={"fineTuneJobRef": {"name": "mathqa"}}, spec__evaluation={
        "dataset": {"uri": "s3://b/test.jsonl", "reference": "{answer}"}, "scorer": {"name": "gsm8k"},
        "baselinePrompt": {"template": "{question}"}})
    made = EvalJob.from_body(evaljob_for(job, "s3://b/runs/mathqa/best"))
    assert made.spec.candidates[1].model.uri == "s3://b/runs/mathqa/best"
    with pytest.raises(ValueError, match="no base model"):
        evaljob_for(job, "")
