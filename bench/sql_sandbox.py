"""SQL scoring throughput: the sandbox's pool of persistent workers against its alternatives, one run.

The same examples (by default the Spider golds of ../shared/datasets/spider, each scored against itself)
are scored by `kubetune.serving.sqlexec` four ways:
  in-process   — `score_example` in this process: every guard but the rlimit and the kill (the baseline);
  pool x1      — the sandbox with one persistent worker process;
  pool xN      — the sandbox with N workers (default: one per CPU, at most 4), examples in parallel;
  per-example  — a fresh worker process for every example (what a process per query would cost at best),
                 on the first --fresh examples only.
Reported: examples/s and queries/s (every query an example runs: the gold on each database of its suite,
forward and reversed, and the prediction on each) for
each, and each one's ratio to the in-process baseline. Then the hostile predictions of issue 12, each
scored in the sandbox next to a correct one: its reason, seconds, and the peak RSS of the worker that ran
it where that worker survived (a killed one has no /proc entry left to read).

    .venv/bin/python bench/sql_sandbox.py
    .venv/bin/python bench/sql_sandbox.py --limit 200 --fresh 20
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path
from typing import Any

from kubetune.serving import sqlexec
from kubetune.serving.scorers import score

SPIDER = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "spider" / "dev-part.jsonl"
HEAD = "CREATE TABLE head (age INTEGER)"
GOLD = "SELECT COUNT(*) FROM head WHERE age > 56"
HOSTILE = {
    "zeroblob CTE": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x<800) "
                    "SELECT zeroblob(999999) FROM c",
    "large instr": "SELECT instr(printf('%.*c', 900000, 'x'), printf('%.*c', 300000, 'x') || 'y')",
    "sorted blobs": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x<800) "
                    "SELECT count(*) FROM (SELECT zeroblob(900000) || x AS b FROM c ORDER BY b)",
    "20 KB statement": "SELECT " + " + ".join(["1"] * 5000),
    "100 KB prediction": "SELECT 1 " + "-" * 100_000,
}


def examples(limit: int) -> list[sqlexec.Example]:
    if not SPIDER.exists():
        raise SystemExit(f"{SPIDER} is absent: the benchmark scores the Spider golds")
    rows = [json.loads(line) for line in SPIDER.read_text().splitlines() if line.strip()][:limit]
    return [(r["answer"], r["answer"], r["context"]) for r in rows]


def count_queries(batch: list[sqlexec.Example], settings: sqlexec.Settings) -> list[int]:
    """Queries each example runs (the gold on each database, forward and reversed; the prediction on each
    until one differs): one heartbeat per query, the setup's heartbeats aside. Suites are not cached here."""
    beats: list[str] = []
    counts = []
    for example in batch:
        beats.clear()
        sqlexec.clear_suite_cache()
        sqlexec.score_example(*example, settings, lambda phase, _: beats.append(phase))
        counts.append(sum(phase != "setup" for phase in beats))
    sqlexec.clear_suite_cache()
    return counts


def timed(label: str, fn: Any, batch: list[sqlexec.Example], per_example: list[int], baseline: float | None
          ) -> float:
    started = time.perf_counter()
    fn(batch)
    seconds = time.perf_counter() - started
    rate = len(batch) / seconds
    ratio = f"{rate / baseline:6.2f}x" if baseline else "  1.00x"
    print(f"{label:<13} {len(batch):5d} examples {seconds:7.2f} s  {rate:8.1f} examples/s  "
          f"{sum(per_example[:len(batch)]) / seconds:8.1f} queries/s  {ratio}")
    return rate


def peak_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=603, help="Spider examples (default: all 603)")
    parser.add_argument("--fresh", type=int, default=40, help="examples for the process-per-example run")
    args = parser.parse_args()
    batch = examples(args.limit)
    settings = sqlexec.Settings()
    n = sqlexec.default_workers()

    def pooled(workers: int) -> Any:
        box = sqlexec.Sandbox(settings.memory_bytes, workers)
        box.score(batch[:workers], settings)  # the workers start (~0.2 s each) before the clock does

        def go(b: list[sqlexec.Example]) -> list[dict[str, Any]]:
            try:
                return box.score(b, settings)
            finally:
                box.close()
        return go

    def fresh(b: list[sqlexec.Example]) -> list[dict[str, Any]]:
        out = []
        for example in b:
            box = sqlexec.Sandbox(settings.memory_bytes, 1)
            out += box.score([example], settings)
            box.close()
        return out

    per_example = count_queries(batch, settings)
    print(f"SQL scoring of {len(batch)} Spider golds against themselves ({sum(per_example)} queries); "
          f"{n} CPU(s) for the pool")
    base = timed("in-process", lambda b: [sqlexec.score_example(*e, settings) for e in b], batch, per_example,
                 None)
    timed("pool x1", pooled(1), batch, per_example, base)
    if n > 1:
        timed(f"pool x{n}", pooled(n), batch, per_example, base)
    timed("per-example", fresh, batch[: args.fresh], per_example, base)

    print("\nhostile predictions (sandbox defaults: 2 s + 0.5 s kill, 256 MiB, 1 MiB results, 16 KiB statements)")
    box = sqlexec.sandbox(settings)
    score("sqlExecution", [GOLD] * n, [GOLD] * n, [{"context": HEAD}] * n)  # the workers start first
    for name, query in HOSTILE.items():
        started = time.perf_counter()
        scored = score("sqlExecution", [query, GOLD], [GOLD, GOLD], [{"context": HEAD}] * 2,
                       {"memoryLimitMiB": str(settings.memory_bytes >> 20)})
        seconds = time.perf_counter() - started
        peaks = [peak_kib(pid) for pid in box.pids()]
        worker = max((p for p in peaks if p is not None), default=None)
        print(f"  {name:<18} {scored.per_example[0]['failure'] or 'scored':<17} {seconds:5.2f} s   "
              f"the correct one: {scored.per_example[1]['score']:.0f}   "
              f"worker peak RSS: {f'{worker / 1024:.0f} MiB' if worker else 'replaced'}")
    print(f"this process's peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
