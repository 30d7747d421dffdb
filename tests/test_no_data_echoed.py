"""No data echoed: a Secret value and a canary file content travel through every error path of the
trainer and the evaluator, and appear in no status, Event, log line, results.json or report.

Each case runs the real entrypoint as the RayJob would (`python -m kubetune.trainer`'s `main`, with Ray's
init a no-op since the data fails before any Ray work; `python -m kubetune.serving.evaluate`'s `main`,
reporting into the EvalJob's status on the fake API) against the real operator. The test plays KubeRay:
the RayJob ends with the message Ray gives a failed entrypoint, the tail of its logs, which the operator
puts into the Failed condition and an Event. What is searched: everything the entrypoint printed and
logged (capfd, caplog at DEBUG), every file it wrote (driver.log, results.json, report.html), the job's
status and Events, and the operator's log. Each case also checks that its error did get there, naming
the file, row, column or field: a search in messages that never arrived would prove nothing.

The canary is searched for by a fragment, so a truncated echo counts too.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from factories import evj_manifest, ftj_manifest
from kubetune.contract.evalplan import api_key_env
from kubetune.contract.progress import StatusReporter
from kubetune.operator import kube
from support.harness import Cluster, Operator, eventually, start_api
from support.httpserver import JsonHandler, LocalServer
from support.workspace import write_workspace
from viggo_like import viggo_like_rows

SECRET = "sk-canary-SECRET-0d6e1b7a94c2"  # an endpoint's API key, from a Secret in the cluster
CANARY = "CANARY-3f9a81c4e5b2d7f0"  # a data file's content: a one-line file may be a token
LEAKS = {"secret": SECRET[10:24], "canary": CANARY[7:15]}  # fragments: a cut echo is an echo too
ROWS = viggo_like_rows(24, seed=5)

pytestmark = pytest.mark.timeout(600)


@dataclass
class Seen:
    """Everything a case left behind, by where it is."""

    places: dict[str, str]

    def leaks(self) -> dict[str, list[str]]:
        return {where: [what for what, fragment in LEAKS.items() if fragment in text]
                for where, text in self.places.items() if any(f in text for f in LEAKS.values())}


def ray_message(rc: int, out: str) -> str:
    """What Ray reports for an entrypoint that failed (KubeRay copies it into the RayJob's status)."""
    return f"Job entrypoint command failed with exit code {rc}, last available logs (truncated to 20,000 chars):\n" \
        + out[-20000:]


def quiet_fake_api(caplog: pytest.LogCaptureFixture) -> None:
    """Every log record at DEBUG, but the fake API's CEL evaluation (in this process, and noisy)."""
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.INFO, logger="celpy")


def files_under(*roots: Path) -> dict[str, str]:
    return {str(p): p.read_text(errors="replace") for root in roots if root.exists()
            for p in sorted(root.rglob("*")) if p.is_file() and ".cache" not in p.parts}


# -- the cluster: fake API, operator, the Secret, a failing endpoint ----------------------------------


class EndpointHandler(JsonHandler):
    """An OpenAI-compatible endpoint that refuses every request, quoting the key it was given and, past
    what an error may show of it, the canary."""

    def do_POST(self) -> None:
        self.read_json()
        key = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
        message = f"Incorrect API key provided: {key}. " + "You can find your API key at ... " * 8 + CANARY
        self.send_json(401, {"error": {"message": message, "type": "invalid_request_error"}})


@dataclass
class World:
    cluster: Cluster
    operator: Operator
    endpoint: LocalServer
    workspace: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("canary")
    workspace = write_workspace(root / "ws", ROWS, n_train=16)
    _tokenizer_whose_chat_template_quotes_the_messages(workspace)
    api, kubeconfig = start_api(root)
    cluster = Cluster(api, kubeconfig)
    cluster.kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "ep-key", "namespace": "default"},
                         "data": {"api-key": base64.b64encode(SECRET.encode()).decode()}})
    with LocalServer(EndpointHandler) as endpoint:
        operator = Operator(kubeconfig, root / "operator.log").start()
        try:
            yield World(cluster, operator, endpoint, workspace)
        finally:
            operator.stop()
            api.stop()


def _tokenizer_whose_chat_template_quotes_the_messages(ws: Path) -> None:
    """ws/base-quoting: the base tokenizer with a chat template that fails quoting the first message (as a
    template's raise_exception() may)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ws / "base")
    tokenizer.chat_template = "{{ raise_exception('cannot format the message ' + messages[0]['content']) }}"
    tokenizer.save_pretrained(ws / "base-quoting")


def operator_side(world: World, kind: str, name: str) -> dict[str, str]:
    """The job's status and Events, and the operator's log."""
    ref = kube.ftj_ref("default", name) if kind == "FineTuneJob" else kube.evj_ref("default", name)
    return {"status": json.dumps(world.cluster.kube.get(ref).get("status") or {}),
            "events": json.dumps(world.cluster.events(name)),
            "operator log": world.operator.log_path.read_text(errors="replace")}


def failed_condition(world: World, kind: str, name: str) -> str:
    ref = kube.ftj_ref("default", name) if kind == "FineTuneJob" else kube.evj_ref("default", name)

    def failed() -> str | None:
        st = world.cluster.kube.get(ref).get("status") or {}
        cond = next((c for c in st.get("conditions", []) if c["type"] == "Failed" and c["status"] == "True"), None)
        return str(cond["message"]) if cond else None

    message: str = eventually(failed, timeout=30, what=f"{kind} {name} Failed")
    return message


# -- the trainer's cases -------------------------------------------------------------------------------


def _write(path: Path, text: str | bytes) -> str:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def _chat(role: str, content: str) -> str:
    return json.dumps({"messages": [{"role": role, "content": content},
                                    {"role": "assistant", "content": "ok"}]}) + "\n"


# name -> (train file's name, its content, dataset overrides, the error the message must name)
TRAINER_CASES: dict[str, tuple[str, str | bytes, dict[str, Any], str]] = {
    # The known case: a one-line CSV whose header is not what the template expects.
    "missing-column": ("train.csv", f"{CANARY}\n", {"format": "csv", "columns": {"ref": "sentence"}},
                       ("train.csv line 1: mapped column(s) 'sentence' (field 'ref') not in the header "
                        "(it has 1 column)")),
    "header-not-the-templates": ("train.csv", f"{CANARY},{SECRET}\nx,y\n", {"format": "csv"},
                                 "train.csv row 1 (line 2): missing fields 'ref', 'mr'"),
    "bad-row-json": ("train.jsonl", '{"ref": "ok", "mr": "ok"}\n{"ref": "' + CANARY + '", "mr": \n', {},
                     "train.jsonl row 2: not valid JSON"),
    "bad-row-not-an-object": ("train.jsonl", json.dumps(CANARY) + "\n", {},
                              "train.jsonl row 1: expected a JSON object, got a string"),
    "bad-row-csv-values": ("train.csv", f"ref,mr\na,b\n{CANARY},b,{SECRET}\n", {"format": "csv"},
                           "train.csv row 2 (line 3): 3 values, but the header has 2 columns"),
    "bad-row-not-utf8": ("train.jsonl", CANARY.encode() + b"\xff\n", {}, "train.jsonl line 1: not UTF-8"),
    "bad-row-chat-role": ("train.jsonl", _chat(CANARY, "hi"), {"format": "chat"},
                          "train.jsonl row 1: message 1: role is not one of system, user, assistant"),
    "missing-key": ("train.jsonl", json.dumps({"ref": CANARY, "meaning": SECRET}) + "\n", {},
                    "train.jsonl row 1: missing field 'mr' (template placeholders: ref, mr)"),
    "bad-template-positional": ("train.jsonl", json.dumps({"ref": CANARY, "mr": SECRET}) + "\n",
                                {"template": {"prompt": "{0}: {ref}", "completion": "{mr}"}},
                                "train.jsonl row 1: missing field '0' (template placeholders: 0, ref, mr)"),
    "bad-template-chat": ("train.jsonl", _chat("user", f"{CANARY} {SECRET}"), {"format": "chat"},
                          ("train.jsonl row 1: the tokenizer's chat template failed: TemplateError: "
                           "cannot format the message <data>")),
}


@pytest.mark.parametrize("case", list(TRAINER_CASES))
def test_the_trainers_errors_echo_no_data(case: str, world: World, tmp_path: Path,
                                          capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import ray
    import yaml

    from kubetune.trainer.__main__ import main

    file, content, dataset, expected = TRAINER_CASES[case]
    name = f"canary-{case}"
    ws = world.workspace
    train = {"uri": _write(tmp_path / file, content), **{k: v for k, v in dataset.items() if k != "template"}}
    manifest = ftj_manifest(
        name, spec__baseModel={"uri": str(ws / ("base-quoting" if case == "bad-template-chat" else "base"))},
        spec__dataset__train=train, spec__dataset__validation={"uri": str(ws / "valid.jsonl")},
        spec__output={"uri": str(tmp_path / "out")})
    if "template" in dataset:
        manifest["spec"]["dataset"]["template"] = dataset["template"]
    if dataset.get("format") == "chat":
        manifest["spec"]["dataset"]["validation"] = {"uri": _write(tmp_path / "valid.jsonl", _chat("user", "hello")),
                                                     "format": "chat"}
        del manifest["spec"]["dataset"]["template"]
    world.cluster.kube.create(manifest)
    world.cluster.wait_rayjob(f"{name}-train")
    world.cluster.report_rayjob(f"{name}-train", jobDeploymentStatus="Running", jobStatus="RUNNING")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(manifest))

    quiet_fake_api(caplog)
    monkeypatch.setattr(ray, "init", lambda *a, **k: None)  # the data fails before any Ray work
    rc = main(["--config", str(tmp_path / "job.yaml"), "--output", str(tmp_path / "out")])
    out, err = capfd.readouterr()
    assert rc == 3, out + err
    world.cluster.report_rayjob(f"{name}-train", jobDeploymentStatus="Failed", jobStatus="FAILED",
                                reason="AppFailed", message=ray_message(rc, out + err))
    condition = failed_condition(world, "FineTuneJob", name)
    seen = Seen({"stdout": out, "stderr": err, "logs": caplog.text, **files_under(tmp_path / "out"),
                 **operator_side(world, "FineTuneJob", name)})

    assert seen.leaks() == {}
    assert "driver.log" in " ".join(seen.places)  # the driver's log was written, and searched
    assert f"error: pre-flight: {expected}" in err and expected in condition


# -- the evaluator's cases -----------------------------------------------------------------------------


def _evaluator_case(files: dict[str, str], **spec: Any) -> Callable[[Path, World], dict[str, Any]]:
    """An EvalJob of one endpoint candidate `ep` (its API key from the Secret) over tmp/test.jsonl."""

    def manifest(tmp: Path, world: World) -> dict[str, Any]:
        for file, text in files.items():
            _write(tmp / file, text)
        candidate = {"name": "ep", "model": {"endpoint": {"url": world.endpoint.url, "model": "m",
                                                          "apiKeySecretRef": {"name": "ep-key", "key": "api-key"}}},
                     "prompt": {"template": "Sentence: {ref}\nMeaning representation:"},
                     "generation": {"maxTokens": 8, "stop": ["\n"]}}
        paths: dict[str, Any] = {"spec__candidates": [candidate],
                                 "spec__dataset": {"uri": str(tmp / "test.jsonl"), "reference": "{mr}"},
                                 "spec__output": {"uri": str(tmp / "eval")}, "spec__concurrency": 4}
        for key, value in spec.items():
            paths[key] = value(tmp, candidate) if callable(value) else value
        return paths

    return manifest


def _rows(*rows: dict[str, str]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _with_prompt(**prompt: Any) -> Callable[[Path, dict[str, Any]], list[dict[str, Any]]]:
    def candidates(tmp: Path, candidate: dict[str, Any]) -> list[dict[str, Any]]:
        return [{**candidate, "prompt": {**candidate["prompt"], **{
            k: (v(tmp) if callable(v) else v) for k, v in prompt.items()}}}]

    return candidates


CLEAN = _rows(*({"ref": r["ref"], "mr": r["mr"]} for r in ROWS[:3]))

# name -> (the EvalJob, the API key the pod gets, the error the message must name; None: the run completes)
EVALUATOR_CASES: dict[str, tuple[Callable[[Path, World], dict[str, Any]], str, str | None]] = {
    "missing-column": (_evaluator_case({"test.csv": f"{CANARY}\n"}, spec__dataset=lambda tmp, _: {
        "uri": str(tmp / "test.csv"), "format": "csv", "columns": {"ref": "sentence"}, "reference": "{mr}"}),
        SECRET, "test.csv line 1: mapped column(s) 'sentence' (field 'ref') not in the header (it has 1 column)"),
    "bad-row": (_evaluator_case({"test.jsonl": CLEAN + '{"ref": "' + CANARY + '", \n'}), SECRET,
                "test.jsonl row 4: not valid JSON"),
    "bad-few-shot-row": (_evaluator_case({"test.jsonl": CLEAN, "shots.jsonl": f"{CANARY}\n"},
                                         spec__candidates=_with_prompt(fewShot=lambda tmp: {
                                             "k": 1, "source": {"uri": str(tmp / "shots.jsonl")}})),
                         SECRET, "shots.jsonl row 1: not valid JSON"),
    "missing-key": (_evaluator_case({"test.jsonl": _rows({"ref": CANARY, "meaning": SECRET})}), SECRET,
                    "test.jsonl row 1: missing field 'mr' used by spec.dataset.reference"),
    "bad-template-positional": (_evaluator_case({"test.jsonl": _rows({"ref": CANARY, "mr": SECRET})},
                                                spec__candidates=_with_prompt(template="{0}: {ref}")),
                                SECRET, "test.jsonl row 1: missing field '0' used by spec.candidates[0].prompt.template"),
    "missing-api-key": (_evaluator_case({"test.jsonl": CLEAN}), "",
                        ('spec.candidates[0].model.endpoint.apiKeySecretRef: no API key for candidate ep: '
                         'Secret "ep-key" or its key "api-key" does not exist')),
    "failing-endpoint": (_evaluator_case({"test.jsonl": CLEAN}), SECRET, None),
}


@pytest.mark.parametrize("case", list(EVALUATOR_CASES))
def test_the_evaluators_errors_echo_no_data(case: str, world: World, tmp_path: Path,
                                            capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from kubetune.serving.evaluate import main

    paths_of, key, expected = EVALUATOR_CASES[case]
    name = f"canary-{case}"
    world.cluster.kube.create(evj_manifest(name, **paths_of(tmp_path, world)))
    rayjob = world.cluster.wait_rayjob(f"{name}-eval")
    world.cluster.report_rayjob(f"{name}-eval", jobDeploymentStatus="Running", jobStatus="RUNNING")
    config = world.cluster.kube.get(kube.Ref("v1", "ConfigMap", "default", f"{name}-eval-config"))
    (tmp_path / "plan.json").write_text(config["data"]["plan.json"])
    assert rayjob  # the operator launched the evaluation: the Secret was there

    quiet_fake_api(caplog)
    monkeypatch.setenv(api_key_env("ep"), key)  # what the pod gets from the Secret (empty: no such key)
    monkeypatch.setattr(StatusReporter, "from_environment", classmethod(
        lambda cls, plural="evaljobs": cls(server=world.cluster.api.url, namespace="default", name=name,
                                           plural=plural)))
    rc = main(["--plan", str(tmp_path / "plan.json"), "--work-dir", str(tmp_path / "work")])
    out, err = capfd.readouterr()
    assert rc == (0 if expected is None else 2), out + err
    if expected is None:  # the endpoint refused every request: the run completes, its errors counted
        world.cluster.report_rayjob(f"{name}-eval", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED",
                                    endTime="2026-11-22T11:00:00Z")
        eventually(lambda: (world.cluster.kube.get(kube.evj_ref("default", name)).get("status") or {})
                   .get("phase") == "Succeeded", timeout=30, what=f"EvalJob {name} Succeeded")
        condition = ""
    else:
        world.cluster.report_rayjob(f"{name}-eval", jobDeploymentStatus="Failed", jobStatus="FAILED",
                                    reason="AppFailed", message=ray_message(rc, out + err))
        condition = failed_condition(world, "EvalJob", name)
    status = world.cluster.kube.get(kube.evj_ref("default", name)).get("status") or {}
    seen = Seen({"stdout": out, "stderr": err, "logs": caplog.text,
                 **files_under(tmp_path / "work", tmp_path / "eval"), **operator_side(world, "EvalJob", name)})

    assert seen.leaks() == {}
    if expected is None:
        assert {"results.json", "report.html"} <= {Path(p).name for p in seen.places}
        assert status["candidates"][0]["errors"] == 3
        results = json.loads((tmp_path / "eval" / "results.json").read_text())
        error = results["examples"][0]["predictions"]["ep"]["error"]
        assert error.startswith("HTTP 401: Incorrect API key provided: <redacted>. You can find") and "…(+" in error
    else:
        assert expected in err and expected in status["evaluationError"] and expected in condition


# -- the pieces: what an error may show of foreign text ------------------------------------------------


def test_an_identifier_is_escaped_and_capped() -> None:
    from kubetune.contract.redact import identifier

    assert identifier("mr") == "'mr'"
    assert identifier("a\nb\x1b[2J") == "'a\\nb\\x1b[2J'"
    assert identifier("x" * 100, limit=8) == "'xxxxxxxx'…(+92 chars)"


def test_an_excerpt_is_bounded_escaped_and_blanks_secrets_and_echoes() -> None:
    from kubetune.contract.redact import excerpt

    prompt = f"Sentence: {CANARY} is great\nMeaning representation:"
    text = f"refused key {SECRET}\x1b[31m for prompt '{prompt}'\n" + "x" * 500
    shown = excerpt(text, 120, secrets=[SECRET], echoes=[prompt])
    assert shown.startswith("refused key <redacted>\\x1b[31m for prompt '<data>'\\n")
    assert shown.endswith(" chars)") and "…(+" in shown  # says that more was cut
    assert "\n" not in shown and "\x1b" not in shown and len(shown) < 160
    assert not any(fragment in shown for fragment in LEAKS.values())
    assert excerpt("a key none here", secrets=["none"]) == "a key none here"  # a placeholder key: kept
    assert excerpt("short", 10) == "short"


def test_a_refused_status_patch_logs_a_bounded_escaped_reason_only(caplog: pytest.LogCaptureFixture) -> None:
    class Refuse(JsonHandler):
        def do_PATCH(self) -> None:
            self.read_json()
            self.send_json(422, {"kind": "Status", "status": "Failure", "reason": "Invalid", "code": 422,
                                 "message": "status.x: Invalid value: \"" + "v" * 400 + CANARY + "\"\n\x1b[2J"})

    with LocalServer(Refuse) as server:
        reporter = StatusReporter(server=server.base, namespace="default", name="x", plural="evaljobs")
        with caplog.at_level(logging.WARNING, logger="kubetune.contract.progress"):
            assert reporter.patch({"progress": {"summary": "1/2"}}) is False
    (line,) = [r.getMessage() for r in caplog.records if r.name == "kubetune.contract.progress"]
    assert "HTTP 422 Invalid: status.x: Invalid value:" in line and "…(+" in line
    assert CANARY[7:15] not in line and "\n" not in line and "\x1b" not in line and len(line) < 400
