"""The generated CRDs: in sync with the models, structural, well-formed, and accepting the examples."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import pydantic
import pytest
import yaml

from factories import del_path, ftj_manifest, get_path
from kube_schema import iter_schema_nodes
from kubetune.api import crd as crd_gen
from kubetune.api.evaljob import EvalJob
from kubetune.api.finetunejob import FineTuneJob

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "crds"
EXAMPLES = REPO / "examples"
CRD_FILES = sorted(crd_gen.all_crds())
KINDS = ["FineTuneJob", "EvalJob"]
MODELS = {"FineTuneJob": FineTuneJob, "EvalJob": EvalJob}
SHORT_NAMES = {"FineTuneJob": "ftj", "EvalJob": "evj"}
FORBIDDEN = ("$ref", "anyOf", "allOf", "oneOf", "not", "title", "$defs", "definitions")


def _version(crd: dict[str, Any]) -> dict[str, Any]:
    (version,) = crd["spec"]["versions"]
    return version


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


@pytest.fixture
def crd(kind, ftj_crd, evj_crd):
    return {"FineTuneJob": ftj_crd, "EvalJob": evj_crd}[kind]


@pytest.fixture
def validator(kind, validators):
    return validators[kind]


# --------------------------------------------------------------------------- (a) drift


@pytest.mark.parametrize("name", CRD_FILES)
def test_committed_crd_matches_the_models(name, generated_crds):
    path = CRD_DIR / name
    assert path.exists(), f"crds/{name} is missing: run `make crds`"
    assert path.read_text() == crd_gen.render(generated_crds[name]), (
        f"crds/{name} is out of date with the pydantic models in kubetune.api: run `make crds` and commit it")


def test_crds_directory_holds_only_generated_crds():
    stale = sorted(p.name for p in CRD_DIR.glob("*.yaml") if p.name not in CRD_FILES)
    assert stale == [], f"crds/ has files the generator does not produce: {stale} (delete them, run `make crds`)"


def test_render_is_deterministic(generated_crds):
    assert all(crd_gen.render(c) == crd_gen.render(crd_gen.all_crds()[n]) for n, c in generated_crds.items())


# --------------------------------------------------------------------------- (b) structural schema


def test_no_non_structural_keywords(validator):
    found = [f"{path or '<root>'}: {key}" for path, node in validator.nodes() for key in FORBIDDEN if key in node]
    assert found == []


def test_every_node_has_a_type(validator):
    untyped = [path or "<root>" for path, node in validator.nodes()
               if "type" not in node and not node.get("x-kubernetes-preserve-unknown-fields")
               and not node.get("x-kubernetes-int-or-string")]
    assert untyped == []


def test_properties_and_additional_properties_never_together(validator):
    both = [path for path, node in validator.nodes() if "properties" in node and "additionalProperties" in node]
    assert both == []


def test_required_fields_are_declared(validator):
    undeclared = [f"{path}.{name}" for path, node in validator.nodes()
                  for name in node.get("required", []) if name not in node.get("properties", {})]
    assert undeclared == []


def test_defaults_are_valid_under_their_own_schema(validator):
    """The apiserver rejects a CRD whose defaults do not validate or would be pruned."""
    bad = []
    for path, node in validator.nodes():
        if "default" not in node:
            continue
        sub = {k: v for k, v in node.items() if k != "x-kubernetes-validations"}
        errors = [e.message for e in jsonschema.Draft4Validator(sub).iter_errors(node["default"])]
        errors += [str(e) for e in validator.unknown_fields(node["default"], sub, path)]
        if errors:
            bad.append(f"{path}: {errors}")
    assert bad == []


def test_crd_defaults_agree_with_model_defaults(ftj_validator):
    """kubectl users see the same defaults as the operator assumes (empty lists and maps aside)."""

    def prune(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: prune(v) for k, v in node.items() if v not in ({}, [])}
        return [prune(v) for v in node] if isinstance(node, list) else node

    manifest = ftj_manifest()
    assert prune(ftj_validator.default(manifest)["spec"]) == prune(FineTuneJob.from_body(manifest).spec.to_wire())


# --------------------------------------------------------------------------- (c) names, subresources, columns


def test_status_subresource(crd):
    assert _version(crd)["subresources"] == {"status": {}}


def test_short_name(crd, kind):
    assert crd["spec"]["names"]["shortNames"] == [SHORT_NAMES[kind]]


def test_category(crd):
    assert "kubetune" in crd["spec"]["names"]["categories"]


def test_namespaced_v1alpha1_served_and_stored(crd):
    version = _version(crd)
    assert (crd["spec"]["scope"], version["name"], version["served"], version["storage"]) == (
        "Namespaced", "v1alpha1", True, True)


def test_printer_columns_select_conditions_by_type(crd):
    columns = [c["jsonPath"] for c in _version(crd)["additionalPrinterColumns"]]
    by_type = [p for p in columns if re.fullmatch(r'\.status\.conditions\[\?\(@\.type=="[A-Za-z]+"\)\]\.\w+', p)]
    assert by_type, columns
    assert not [p for p in columns if re.search(r"conditions\[\d+\]", p)], "never select a condition by index"


def test_printer_columns_point_at_declared_fields(crd, validator):
    paths = {path for path, _ in validator.nodes()}
    missing = []
    for column in _version(crd)["additionalPrinterColumns"]:
        field = re.sub(r"\[\?\(@\.type==\"\w+\"\)\]", "[*]", column["jsonPath"]).lstrip(".")
        if not field.startswith("metadata.") and field not in paths:
            missing.append(column["jsonPath"])
    assert missing == []


def test_printer_column_types_are_valid(crd):
    allowed = {"integer", "number", "string", "boolean", "date"}
    assert {c["type"] for c in _version(crd)["additionalPrinterColumns"]} <= allowed


# --------------------------------------------------------------------------- (d) descriptions


def test_every_description_is_non_empty(validator):
    empty = [path or "<root>" for path, node in validator.nodes()
             if "description" in node and not str(node["description"]).strip()]
    assert empty == []


def test_every_field_has_a_description(validator):
    # metadata is the apiserver's ObjectMeta: the CRD may not describe or restrict it.
    missing = [path for path, node in validator.nodes()
               if path and path != "metadata" and not path.endswith(("[*]", "{*}")) and "description" not in node]
    assert missing == []


# --------------------------------------------------------------------------- CEL rules


def _all_rules() -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    out = []
    for kind, build in (("FineTuneJob", crd_gen.finetunejob_crd), ("EvalJob", crd_gen.evaljob_crd)):
        for path, node in iter_schema_nodes(_version(build())["schema"]["openAPIV3Schema"]):
            for rule in node.get("x-kubernetes-validations", []):
                out.append((kind, path, node, rule))
    return out


ALL_RULES = _all_rules()
RULE_IDS = [f"{k}:{p or '<root>'}:{r['rule'][:48]}" for k, p, _, r in ALL_RULES]


def test_crds_have_cel_rules():
    assert len(ALL_RULES) >= 6


@pytest.mark.usefixtures("requires_cel")
@pytest.mark.parametrize(("kind", "path", "node", "rule"), ALL_RULES, ids=RULE_IDS)
def test_cel_rule_compiles(ftj_validator, kind, path, node, rule):
    """A rule we cannot evaluate offline is a rule we cannot trust: every one must compile in cel-python."""
    ftj_validator.compile(rule["rule"])


@pytest.mark.usefixtures("requires_cel")
def test_no_cel_rule_is_skipped_by_the_fake_apiserver(crd_validator, generated_crds):
    """The fake apiserver's CEL engine does not enforce rules it cannot compile or evaluate: none may be."""
    fresh = {c["spec"]["names"]["kind"]: crd_validator(c) for c in generated_crds.values()}
    for _, doc in EXAMPLE_DOCS:
        fresh[doc["kind"]].errors(doc)
    skipped = [rule for v in fresh.values() for rule in v.skipped_cel_rules]
    assert skipped == []


@pytest.mark.parametrize(("kind", "path", "node", "rule"), ALL_RULES, ids=RULE_IDS)
def test_cel_rule_has_a_message(kind, path, node, rule):
    assert rule.get("message", "").strip(), f"{kind} {path}: rule {rule['rule']!r} needs a message"


@pytest.mark.parametrize(("kind", "path", "node", "rule"), ALL_RULES, ids=RULE_IDS)
def test_cel_rule_references_declared_fields(kind, path, node, rule):
    """`self.x.y` must exist in the schema: cel-python does not type-check, the apiserver does."""
    undeclared = []
    for match in re.finditer(r"\b(?:self|oldSelf)((?:\.\w+)+)(\()?", rule["rule"]):
        names = match.group(1).strip(".").split(".")
        if match.group(2):
            names = names[:-1]  # `.matches(` is a method call, not a field
        if not path and names[:2] in (["metadata", "name"], ["metadata", "generateName"]):
            continue  # the only metadata a root rule may read
        chain = match.group(1)
        schema = node
        for name in names:
            props = schema.get("properties") or {}
            if name not in props:
                undeclared.append(chain)
                break
            schema = props[name]
    assert undeclared == [], f"{kind} {path or '<root>'}: {rule['rule']}"


# --------------------------------------------------------------------------- (e) examples


def _example_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(EXAMPLES.rglob("*.y*ml")):
        for index, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if isinstance(doc, dict) and doc.get("kind") in KINDS:
                docs.append((f"{path.relative_to(EXAMPLES)}#{index}", doc))
    return docs


EXAMPLE_DOCS = _example_documents()
EXAMPLE_IDS = [name for name, _ in EXAMPLE_DOCS]


def test_examples_exist():
    names = {name.split("#")[0] for name in EXAMPLE_IDS}
    assert {"viggo/finetunejob.yaml", "minimal/finetunejob.yaml"} <= names


@pytest.mark.parametrize(("name", "doc"), EXAMPLE_DOCS, ids=EXAMPLE_IDS)
def test_example_is_accepted_by_the_crd(validators, name, doc):
    """Schema, unknown fields, metadata and (when cel-python is installed) every CEL rule."""
    errors = validators[doc["kind"]].errors(doc)
    assert errors == [], "\n".join(map(str, errors))


@pytest.mark.parametrize(("name", "doc"), EXAMPLE_DOCS, ids=EXAMPLE_IDS)
def test_example_parses_with_the_model(name, doc):
    assert MODELS[doc["kind"]].from_body(doc).metadata.name == doc["metadata"]["name"]


@pytest.mark.parametrize(("name", "doc"), EXAMPLE_DOCS, ids=EXAMPLE_IDS)
def test_example_declares_the_served_api_version(name, doc):
    assert doc["apiVersion"] == "kubetune.io/v1alpha1"


def _leaf_paths(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _leaf_paths(v, f"{prefix}.{k}" if prefix else k)]
    return [prefix]


MINIMAL = yaml.safe_load((EXAMPLES / "minimal" / "finetunejob.yaml").read_text())
MINIMAL_LEAVES = [p for p in _leaf_paths(MINIMAL) if p not in ("apiVersion", "kind")]


@pytest.mark.parametrize("path", MINIMAL_LEAVES)
def test_minimal_example_needs_every_field(ftj_validator, path):
    """The minimal example is minimal: without any one of its fields it is no longer valid."""
    doc = del_path(copy.deepcopy(MINIMAL), path)
    with pytest.raises(pydantic.ValidationError):
        FineTuneJob.from_body(doc)
    if ftj_validator.cel:
        assert ftj_validator.errors(doc), f"the CRD accepts the minimal example without {path}"


# The seed case study, as examples/viggo/finetunejob.yaml must keep stating it.
VIGGO_SETTINGS = {
    "metadata.name": "viggo-llama-2-7b",
    "spec.baseModel.name": "meta-llama/Llama-2-7b-hf",
    "spec.baseModel.tokenSecretRef": {"name": "hf-token", "key": "token"},
    "spec.dataset.train.uri": "s3://kubetune-examples/viggo/train.jsonl",
    "spec.dataset.validation.uri": "s3://kubetune-examples/viggo/valid.jsonl",
    "spec.dataset.template.specialTokens": ["<START_Q>", "<END_Q>", "<START_A>", "<END_A>"],
    "spec.dataset.template.prompt": "<START_Q>{ref}<END_Q>",
    "spec.dataset.template.completion": "<START_A>{mr}",
    "spec.dataset.template.stop": "<END_A>",
    "spec.dataset.maxLength": 512,
    "spec.hyperparameters.epochs": 10,
    "spec.hyperparameters.learningRate": 5e-6,
    "spec.hyperparameters.perDeviceBatchSize": 16,
    "spec.deepspeed.zeroStage": 3,
    "spec.deepspeed.offloadOptimizer": "cpu",
    "spec.deepspeed.precision": "bf16",
    "spec.deepspeed.gradientCheckpointing": True,
    "spec.resources.workers": 16,
    "spec.resources.gpusPerWorker": 1,
    "spec.resources.gpuType": "A10G",
    "spec.output.uri": "s3://kubetune-examples/runs/viggo-llama-2-7b",
    "spec.output.keepCheckpoints": 1,
}
VIGGO = yaml.safe_load((EXAMPLES / "viggo" / "finetunejob.yaml").read_text())


@pytest.mark.parametrize(("path", "expected"), VIGGO_SETTINGS.items(), ids=list(VIGGO_SETTINGS))
def test_viggo_example_states_the_case_study(path, expected):
    assert get_path(VIGGO, path) == expected
