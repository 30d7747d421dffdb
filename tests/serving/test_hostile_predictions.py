"""Hostile predictions (issue 12): each scores 0 with the reason it could not be scored, the rows beside
it still score, and every row has its entry.

A model's output is untrusted input to the evaluator. SQL predictions run in the sandbox's worker
processes (`kubetune.serving.sqlexec.Sandbox`): under RLIMIT_AS, with the progress handler, result, value
and statement caps, and the parent's wall-clock kill. Each test names the guard it exercises; the
assertions are on the reason reported, never on how long the query took, except for a hang guard: ten
times the time the guard allows.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kubetune.serving import scorers, sqlexec
from kubetune.serving.scorers import MAX_PREDICTION_CHARS, SCORERS, Failure, Scored, extract_gsm8k, score
from support import shared

HEAD = "CREATE TABLE head (age INTEGER)"
GOLD = "SELECT COUNT(*) FROM head WHERE age > 56"

ZEROBLOB_CTE = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x<800) "
                "SELECT zeroblob(999999) FROM c")
# One instr() over a 900 KB haystack and a 300 KB needle that never matches: a single SQLite opcode of
# seconds, which no progress handler can interrupt.
LARGE_INSTR = "SELECT instr(printf('%.*c', 900000, 'x'), printf('%.*c', 300000, 'x') || 'y')"
# 500 rows, each an instr() of ~0.2 s over strings built from the row (SQLite cannot hoist them out of
# the loop): ~100 s in all, ~20 opcodes a row.
SLOW_ROWS = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x<500) "
             "SELECT instr(printf('%.*c', 150000 + x % 2, 'x'), printf('%.*c', 40000, 'x') || 'y') FROM c")
# 800 blobs of 900 KB sorted: SQLite's sorter keeps them (temp_store = MEMORY), ~700 MiB.
SORTED_BLOBS = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x<800) "
                "SELECT count(*) FROM (SELECT zeroblob(900000) || x AS b FROM c ORDER BY b)")
LONG_STATEMENT = "SELECT " + " + ".join(["1"] * 5000)  # ~20 KB
HUNDRED_KB = "SELECT 1 " + "-" * 100_000
HUGE_NUMBER = "9" * 4301  # int() refuses more than 4,300 digits


def settings(**limits: Any) -> sqlexec.Settings:
    """The scorer's settings with some limits changed (tests shorten the time limits)."""
    return sqlexec.Settings(**limits)


def kill_after(s: sqlexec.Settings) -> float:
    return s.max_seconds + s.kill_grace_seconds


def sql_beside_a_correct_one(prediction: str, **options: str) -> tuple[Scored, float]:
    """Score `prediction` and a correct query on the same example; (scored, seconds)."""
    started = time.monotonic()
    scored = score("sqlExecution", [prediction, GOLD], [GOLD, GOLD], [{"context": HEAD}] * 2, options)
    return scored, time.monotonic() - started


def sandboxed(prediction: str, s: sqlexec.Settings) -> tuple[list[dict[str, Any]], float]:
    """`prediction` and a correct query through the sandbox with settings `s`; (entries, seconds)."""
    started = time.monotonic()
    entries = sqlexec.score_examples([(prediction, GOLD, HEAD), (GOLD, GOLD, HEAD)], s)
    return entries, time.monotonic() - started


def assert_stopped(entry: dict[str, Any], reason: Failure) -> None:
    assert (entry["failure"], entry["score"], entry["dropped"]) == (reason, 0.0, None)


# -- SQL: the hostile queries -------------------------------------------------------------------


def test_the_zeroblob_cte_scores_zero_as_a_result_too_large() -> None:
    # Guard: Settings.max_result_bytes (rows counted as they are fetched). Without it, 800 rows of 1 MB
    # were materialised (2.3 GB RSS in the evaluator itself).
    scored, seconds = sql_beside_a_correct_one(ZEROBLOB_CTE)
    assert_stopped(scored.per_example[0], Failure.RESULT_TOO_LARGE)
    assert scored.per_example[1]["score"] == 1.0
    assert seconds < 10 * kill_after(sqlexec.Settings())


def test_a_large_instr_is_killed_by_the_parent_after_the_limit() -> None:
    # Guard: the parent's wall-clock kill. The progress handler cannot stop a single opcode; it would
    # only report the query stopped once the instr() returned, seconds later.
    s = settings(max_seconds=0.5, kill_grace_seconds=0.5)
    entries, seconds = sandboxed(LARGE_INSTR, s)
    assert_stopped(entries[0], Failure.TIMEOUT)
    assert entries[0]["error"] == "query killed after 1 s"
    assert entries[1]["score"] == 1.0
    assert seconds < 10 * kill_after(s)


def test_a_query_of_many_slow_steps_is_interrupted_in_the_worker_before_any_kill() -> None:
    # Guard: the progress handler, every PROGRESS_OPCODES (100) opcodes (~5 rows, ~1 s here), checks the
    # clock. Every 1,000 opcodes (~50 rows, ~10 s) it would come after the parent's kill at 4.3 s.
    s = settings(max_seconds=0.3, kill_grace_seconds=4.0, workers=1)
    box = sqlexec.sandbox(s)
    sandboxed(GOLD, s)  # the worker is up
    started = box.started
    entries, seconds = sandboxed(SLOW_ROWS, s)
    assert_stopped(entries[0], Failure.TIMEOUT)
    assert entries[0]["error"] == "query stopped: over 0.3 s"
    assert box.started == started  # the worker was not killed
    assert seconds < 10 * kill_after(s)


def test_a_query_over_the_memory_limit_scores_zero_and_its_worker_is_replaced() -> None:
    # Guard: RLIMIT_AS in the worker (128 MiB here). SQLite's sorter needs ~700 MiB for these blobs.
    scored, _ = sql_beside_a_correct_one(SORTED_BLOBS, memoryLimitMiB="128")
    assert_stopped(scored.per_example[0], Failure.MEMORY_LIMIT)
    assert scored.per_example[1]["score"] == 1.0
    again, _ = sql_beside_a_correct_one(GOLD, memoryLimitMiB="128")
    assert [e["score"] for e in again.per_example] == [1.0, 1.0]


def test_a_statement_over_the_length_limit_is_never_executed() -> None:
    # Guard: Settings.max_statement_chars (16 KiB), checked before sqlglot or SQLite sees the text.
    scored, _ = sql_beside_a_correct_one(LONG_STATEMENT)
    assert_stopped(scored.per_example[0], Failure.STATEMENT_TOO_LONG)
    assert scored.per_example[0]["executed"] is None
    assert scored.per_example[1]["score"] == 1.0


def test_a_value_over_the_value_limit_scores_zero() -> None:
    # Guard: SQLITE_LIMIT_LENGTH (max_value_bytes): a blob of 5 MB is refused as it is built.
    scored, _ = sql_beside_a_correct_one("SELECT length(zeroblob(5000000))")
    assert_stopped(scored.per_example[0], Failure.VALUE_TOO_LARGE)


def test_a_worker_that_dies_mid_query_scores_zero_and_the_next_example_still_scores() -> None:
    # Guard: the parent reads the worker's end of the socket closing as workerCrashed, not as a hang.
    s = settings(max_seconds=60, kill_grace_seconds=60, workers=1, memory_bytes=200 << 20)
    box = sqlexec.sandbox(s)
    sandboxed(GOLD, s)  # the worker is up: the slow query's setup and gold take milliseconds

    def kill_the_worker() -> None:
        time.sleep(1.0)
        for pid in box.pids():
            os.kill(pid, signal.SIGKILL)

    threading.Thread(target=kill_the_worker, daemon=True).start()
    entries, _ = sandboxed(LARGE_INSTR, s)
    assert_stopped(entries[0], Failure.WORKER_CRASHED)
    assert entries[1]["score"] == 1.0


def test_a_worker_that_cannot_start_fails_the_scoring_rather_than_dropping_every_example(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Guard: the worker's "ready" handshake. Without it, a sandbox that cannot run anything would report
    # every example as dropped ("tables cannot be built") and the scorer would look healthy.
    monkeypatch.setattr(sys, "executable", "/bin/false")
    box = sqlexec.Sandbox(sqlexec.Settings().memory_bytes, 1)
    with pytest.raises(RuntimeError, match="worker process did not start"):
        box.score([(GOLD, GOLD, HEAD)], sqlexec.Settings())


def test_the_workers_do_not_inherit_the_evaluators_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_CANDIDATE_API_KEY", "sk-canary")  # as an endpoint's key reaches the pod
    box = sqlexec.Sandbox(sqlexec.Settings().memory_bytes, 1)
    try:
        box.score([(GOLD, GOLD, HEAD)], sqlexec.Settings())
        environments = [Path(f"/proc/{pid}/environ").read_bytes() for pid in box.pids()]
    finally:
        box.close()
    assert environments
    assert not [e for e in environments if b"sk-canary" in e]


def test_the_gold_query_runs_in_the_same_sandbox() -> None:
    # A gold that the guards stop drops its example, with the reason, rather than scoring anything.
    scored = score("sqlExecution", [GOLD], [ZEROBLOB_CTE], [{"context": HEAD}])
    entry = scored.per_example[0]
    assert (entry["dropped"], entry["goldFailure"], scored.kept) == ("gold fails to execute",
                                                                      Failure.RESULT_TOO_LARGE, 0)


def test_every_hostile_query_in_one_run_scores_zero_with_its_reason_and_the_rest_score() -> None:
    hostile = {ZEROBLOB_CTE: Failure.RESULT_TOO_LARGE, LARGE_INSTR: Failure.TIMEOUT,
               LONG_STATEMENT: Failure.STATEMENT_TOO_LONG, HUNDRED_KB: Failure.PREDICTION_TOO_LONG,
               "SELECT nonsense FROM nowhere": Failure.SQL_ERROR}
    predictions = [p for h in hostile for p in (h, GOLD)]
    scored = score("sqlExecution", predictions, [GOLD] * len(predictions), [{"context": HEAD}] * len(predictions))
    assert [e["failure"] for e in scored.per_example[::2]] == list(hostile.values())
    assert [e["score"] for e in scored.per_example[1::2]] == [1.0] * len(hostile)
    assert (scored.kept, scored.metrics) == (len(predictions), {"executionAccuracy": 0.5})
    assert scored.failures == {str(reason): 1 for reason in hostile.values()}
    assert "5 predictions could not be scored and scored 0: " in scored.notes[-1]


def test_real_spider_golds_score_full_marks_against_themselves_in_the_sandbox() -> None:
    path = shared.require(shared.DATASETS / "spider" / "dev-part.jsonl", "Spider golds are not run in the sandbox")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    golds = [r["answer"] for r in rows]
    scored = score("sqlExecution", golds, golds, rows)
    assert [e for e in scored.per_example if e["goldFailure"] or e["failure"]] == []
    assert scored.metrics == {"executionAccuracy": 1.0}
    assert scored.kept > 0.8 * len(rows)


# -- every scorer: one prediction that cannot be scored never stops the others --------------------------

ANSWERS = {"viggo": "inform(name[a])", "gsm8k": "#### 4", "sqlExecution": GOLD, "exactMatch": "yes",
           "chrf": "the same words", "bleu": "the same words"}


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_a_100_kb_prediction_scores_zero_as_too_long_in_every_scorer(name: str) -> None:
    # Guard: MAX_PREDICTION_CHARS, checked before the scorer reads the prediction.
    gold = ANSWERS[name]
    long = gold + " " * 10 + "x" * (100_000 - len(gold))
    assert len(long) > MAX_PREDICTION_CHARS
    scored = score(name, [long, gold], [gold, gold], [{"context": HEAD}] * 2)
    assert_stopped(scored.per_example[0], Failure.PREDICTION_TOO_LONG)
    assert scored.per_example[1]["score"] == pytest.approx(1.0)
    assert scored.failures == {"predictionTooLong": 1}


def test_a_4301_digit_gsm8k_answer_scores_zero_as_a_number_too_long() -> None:
    # Guard: MAX_ANSWER_DIGITS. Before, int() raised ValueError on it and the run was lost.
    scored = score("gsm8k", [f"#### {HUGE_NUMBER}", "#### 72"], ["#### 72", "#### 72"])
    assert_stopped(scored.per_example[0], Failure.NUMBER_TOO_LONG)
    assert scored.per_example[1]["score"] == 1.0
    assert (scored.kept, scored.metrics["accuracy"]) == (2, 0.5)


def test_gsm8k_numbers_of_any_length_are_read_exactly_as_text() -> None:
    assert extract_gsm8k(f"#### -{HUGE_NUMBER}.500") == (f"-{HUGE_NUMBER}.5", f"-{HUGE_NUMBER}.5")


def test_a_prediction_on_which_a_scorer_raises_scores_zero_and_the_others_still_score(
        monkeypatch: pytest.MonkeyPatch) -> None:
    parse = scorers.parse_mr

    def fragile(text: str) -> scorers.MeaningRepresentation:
        if "boom" in text:
            raise RuntimeError("a bug in the scorer")
        return parse(text)

    monkeypatch.setattr(scorers, "parse_mr", fragile)
    scored = score("viggo", ["inform(name[boom])", "inform(name[a])"], ["inform(name[a])"] * 2)
    assert_stopped(scored.per_example[0], Failure.SCORER_ERROR)
    assert scored.per_example[0]["scorerError"] == "RuntimeError"
    assert scored.per_example[1]["score"] == 1.0
