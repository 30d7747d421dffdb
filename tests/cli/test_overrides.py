"""`--set` paths and values (kubetune.cli.overrides), on plain documents."""

from __future__ import annotations

import re
from typing import Any

import pytest

from factories import evj_manifest, ftj_manifest
from kubetune.cli.overrides import apply, parse


def applied(doc: dict[str, Any], *sets: str) -> dict[str, Any]:
    apply([parse(s) for s in sets], [doc])
    return doc


def test_a_value_is_read_as_yaml() -> None:
    doc = applied(ftj_manifest(), "spec.hyperparameters.epochs=2", "spec.hyperparameters.learningRate=5.0e-6",
                  "spec.suspend=true", "spec.dataset.template.specialTokens=[a, b]", 'metadata.name="007"')
    hp = doc["spec"]["hyperparameters"]
    assert (hp["epochs"], hp["learningRate"], doc["spec"]["suspend"]) == (2, 5e-6, True)
    assert doc["spec"]["dataset"]["template"]["specialTokens"] == ["a", "b"] and doc["metadata"]["name"] == "007"


def test_an_empty_value_is_the_empty_string() -> None:
    assert applied(ftj_manifest(), "metadata.labels.tier=")["metadata"]["labels"] == {"tier": ""}


def test_null_removes_a_field() -> None:
    doc = applied(ftj_manifest(), "spec.dataset.validation=null")
    assert "validation" not in doc["spec"]["dataset"]


def test_missing_mappings_on_the_way_are_created() -> None:
    doc = applied(ftj_manifest(), "spec.resources.worker.memory=64Gi")
    assert doc["spec"]["resources"] == {"worker": {"memory": "64Gi"}}


def test_a_list_item_is_addressed_by_index() -> None:
    doc = applied(evj_manifest(), "spec.candidates[1].generation.maxTokens=64")
    assert doc["spec"]["candidates"][1]["generation"] == {"stop": ["\n"], "maxTokens": 64}


def test_an_index_equal_to_the_length_appends() -> None:
    doc = applied(ftj_manifest(), "spec.dataset.template.specialTokens[4]=<SEP>")
    assert doc["spec"]["dataset"]["template"]["specialTokens"][-1] == "<SEP>"


def test_an_index_past_the_end_is_refused() -> None:
    with pytest.raises(ValueError, match=r"index 9 is past the end of spec\.candidates \(a list of 2\)"):
        applied(evj_manifest(), "spec.candidates[9].name=x")


def test_an_escaped_dot_stays_in_the_key() -> None:
    doc = applied(ftj_manifest(), r"metadata.labels.app\.kubernetes\.io/part-of=demo")
    assert doc["metadata"]["labels"] == {"app.kubernetes.io/part-of": "demo"}


def test_setting_inside_a_scalar_is_refused() -> None:
    with pytest.raises(ValueError, match=r"spec\.output\.uri is not a mapping"):
        applied(ftj_manifest(), "spec.output.uri.bucket=x")


@pytest.mark.parametrize(("text", "said"), [
    ("spec.hyperparameters.epochs", "expected [Kind[/name]:]path=value"),
    ("kind=EvalJob", "the path must start with spec. or metadata."),
    ("status.phase=Succeeded", "the path must start with spec. or metadata."),
    ("Pod/x:spec.a=1", "'Pod/x' is not a selector"),
    ("spec.a[x]=1", "'a[x]' is not a key or key[index]"),
    ("spec.a={", "the value is not valid YAML"),
])
def test_a_malformed_set_says_what_is_wrong(text: str, said: str) -> None:
    with pytest.raises(ValueError, match=re.escape(said)):
        parse(text)


