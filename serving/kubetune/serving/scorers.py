"""Task scorers: plain functions from (predictions, golds, rows, options) to a `Scored`, pluggable by name.

`score("viggo", predictions, golds)` is the whole interface. Each scorer sees the raw completions (it strips
whitespace and takes what it defines as the answer), the references, the full dataset rows (the SQL scorer
needs a row's `CREATE TABLE` context) and the EvalJob's `scorer.options` (strings, as the CRD carries them).

Conventions every scorer keeps, so the report and the gate can treat them alike:
- `metrics` aggregates over the kept examples only; accuracies are fractions 0..1, chrF and BLEU are on
  sacrebleu's 0..100 scale. With no example kept, `metrics` is empty (a gate on it then fails, rather than
  passing on a made-up 0 or 1).
- `per_example` has one entry per input, in order: `score` (the primary metric for that example, 0..1;
  0.0 for dropped examples), `dropped` (None, or why the example was excluded), then scorer-specific fields.
- A prediction that cannot be read (an MR that does not parse, SQL that fails) scores 0, never raises; the
  reason is in its per-example entry. Bad input from the operator's side (unknown scorer or option,
  mismatched lengths) raises ValueError.
- Every entry has `failure`: None, or why the prediction could not be scored at all (a `Failure`: over
  `MAX_PREDICTION_CHARS`, a number too long to be an answer, a query stopped by the SQL sandbox, an
  exception in the scorer). Such a prediction scores 0 and the run goes on; `Scored.failures` counts the
  reasons and a note lists them.

Heavy imports (sacrebleu, sqlglot) happen inside the scorers that need them, so importing this module is
cheap and pulls in neither torch nor ray.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "MAX_PREDICTION_CHARS",
    "SCORERS",
    "Failure",
    "MRParseError",
    "MeaningRepresentation",
    "Scored",
    "ScorerFn",
    "check_options",
    "extract_gsm8k",
    "get_scorer",
    "parse_mr",
    "register",
    "score",
]


MAX_PREDICTION_CHARS = 65_536
"""A longer prediction is not scored (`predictionTooLong`): completions are a few thousand characters."""


class Failure(StrEnum):
    """Why a prediction could not be scored (it scores 0): its per-example entry's `failure`."""

    PREDICTION_TOO_LONG = "predictionTooLong"
    """Over MAX_PREDICTION_CHARS."""
    NUMBER_TOO_LONG = "numberTooLong"
    """gsm8k: the extracted answer has more than MAX_ANSWER_DIGITS digits."""
    STATEMENT_TOO_LONG = "statementTooLong"
    """sqlExecution: the query is over the statement limit; never executed."""
    SQL_ERROR = "sqlError"
    """sqlExecution: the query does not parse, is not a query, or SQLite refuses it."""
    TIMEOUT = "timeout"
    """sqlExecution: over the query's time or step budget (interrupted, or its worker killed)."""
    MEMORY_LIMIT = "memoryLimit"
    """sqlExecution: the worker's address-space limit refused an allocation."""
    RESULT_TOO_LARGE = "resultTooLarge"
    """sqlExecution: more rows or result bytes than the limits."""
    VALUE_TOO_LARGE = "valueTooLarge"
    """sqlExecution: the query made a string or blob over the value limit."""
    WORKER_CRASHED = "workerCrashed"
    """sqlExecution: the worker process died while running the query."""
    SCORER_ERROR = "scorerError"
    """The scorer raised on this prediction (a bug; the type of the exception is in the entry)."""


class Unscorable(Exception):
    """Raised by a scorer's per-example function: the prediction scores 0 with this reason."""

    def __init__(self, reason: Failure) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Scored:
    """What a scorer returns; see the module docstring for the conventions."""

    metrics: dict[str, float]
    per_example: list[dict[str, Any]]
    primary: str
    kept: int
    dropped: int
    notes: list[str] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    """Predictions that could not be scored, by `Failure` (set by `score`)."""


ScorerFn = Callable[[Sequence[str], Sequence[str], Sequence[Mapping[str, Any]], Mapping[str, Any]], Scored]

SCORERS: dict[str, ScorerFn] = {}
OPTIONS: dict[str, frozenset[str]] = {}
"""The option names each scorer understands; any other raises, so a typo is not silently ignored."""


def register(name: str, options: Sequence[str] = ()) -> Callable[[ScorerFn], ScorerFn]:
    """Decorator: make `fn` available as scorer `name`, accepting the listed option names."""

    def add(fn: ScorerFn) -> ScorerFn:
        SCORERS[name] = fn
        OPTIONS[name] = frozenset(options)
        return fn

    return add


def get_scorer(name: str) -> ScorerFn:
    """The scorer called `name`; ValueError (naming the known ones) for an unknown name."""
    try:
        return SCORERS[name]
    except KeyError:
        raise ValueError(f"unknown scorer {name!r}; known scorers: {', '.join(sorted(SCORERS))}") from None


def check_options(name: str, options: Mapping[str, Any] | None) -> None:
    """Raise ValueError for an unknown scorer, an option it does not understand, or an option's bad value.

    A caller calls this before generating anything, to fail early: it scores zero examples, which reads
    every option. `score` checks the names again.
    """
    _check_names(name, options)
    SCORERS[name]([], [], [], options or {})


def _check_names(name: str, options: Mapping[str, Any] | None) -> None:
    get_scorer(name)
    unknown = sorted(set(options or {}) - OPTIONS[name])
    if unknown:
        known = ", ".join(sorted(OPTIONS[name])) or "none"
        raise ValueError(f"scorer {name!r} has no option(s) {', '.join(map(repr, unknown))}; its options: {known}")


def score(name: str, predictions: Sequence[str], golds: Sequence[str],
          rows: Sequence[Mapping[str, Any]] | None = None, options: Mapping[str, Any] | None = None) -> Scored:
    """Score `predictions` against `golds` (and their dataset `rows`) with the scorer called `name`."""
    _check_names(name, options)
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions but {len(golds)} references")
    if rows is None:
        rows = [{} for _ in golds]
    elif len(rows) != len(golds):
        raise ValueError(f"{len(rows)} rows but {len(golds)} references")
    scored = SCORERS[name](predictions, golds, rows, options or {})
    counts = Counter(str(e["failure"]) for e in scored.per_example if e.get("failure") is not None)
    scored.failures = dict(sorted(counts.items()))
    if counts:
        total = sum(counts.values())
        parts = ", ".join(f"{reason} ({n})" for reason, n in counts.most_common())
        scored.notes.append(f"{total} prediction{'s' if total != 1 else ''} could not be scored and scored 0: "
                            f"{parts}")
    return scored


# -- shared helpers --------------------------------------------------------------------------------------

_WS = re.compile(r"\s+")


def normalize_ws(text: str) -> str:
    """Collapse runs of whitespace to one space and strip the ends."""
    return _WS.sub(" ", text).strip()


def bool_option(options: Mapping[str, Any], key: str, default: bool) -> bool:
    """An option given as a string ('true'/'false', as the CRD carries it) or a bool."""
    value = options.get(key, default)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise ValueError(f"option {key}: expected true or false, got {value!r}")


def int_option(options: Mapping[str, Any], key: str, default: int, minimum: int, maximum: int) -> int:
    """An integer option within [minimum, maximum], given as a string or an int."""
    value = options.get(key, default)
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ValueError(f"option {key}: expected an integer, got {value!r}") from None
    if not minimum <= number <= maximum:
        raise ValueError(f"option {key}: {number} is outside {minimum}..{maximum}")
    return number


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def dropped_note(reasons: Sequence[str | None]) -> list[str]:
    """'12 examples dropped: gold result empty (9), gold returns the whole table (3)', or nothing."""
    counts = Counter(r for r in reasons if r is not None)
    if not counts:
        return []
    total = sum(counts.values())
    parts = ", ".join(f"{reason} ({n})" for reason, n in counts.most_common())
    return [f"{total} example{'s' if total != 1 else ''} dropped: {parts}"]


def each(predictions: Sequence[str], golds: Sequence[str], rows: Sequence[Mapping[str, Any]],
         blank: Mapping[str, Any], fn: Callable[[dict[str, Any], str, str, Mapping[str, Any]], None]
         ) -> list[dict[str, Any]]:
    """One entry per example: `blank` (after score, dropped, failure) filled in by `fn(entry, prediction,
    gold, row)`. When `fn` raises `Unscorable`, the entry scores 0 with that failure (`fn` raises it
    before judging the prediction); when it raises anything else, the entry is reset to `blank` with
    failure `scorerError`: one prediction never aborts the others."""
    template: dict[str, Any] = {"score": 0.0, "dropped": None, "failure": None, **blank}
    per_example: list[dict[str, Any]] = []
    for prediction, gold, row in zip(predictions, golds, rows, strict=True):
        entry = dict(template)
        per_example.append(entry)
        try:
            fn(entry, prediction, gold, row)
        except Unscorable as exc:
            entry.update(score=0.0, failure=exc.reason)
        except Exception as exc:  # noqa: BLE001 - one prediction must never abort the evaluation
            entry.clear()
            entry.update(template, failure=Failure.SCORER_ERROR, scorerError=type(exc).__name__)
    return per_example


def check_length(prediction: str) -> None:
    """Unscorable(predictionTooLong) past MAX_PREDICTION_CHARS; call it once the gold is known usable."""
    if len(prediction) > MAX_PREDICTION_CHARS:
        raise Unscorable(Failure.PREDICTION_TOO_LONG)


def accuracies(per_example: Sequence[Mapping[str, Any]], fields: Mapping[str, str]) -> dict[str, float]:
    """{metric: mean of the boolean per-example field} over the kept examples; empty when none is kept."""
    kept = [e for e in per_example if e["dropped"] is None]
    if not kept:
        return {}
    return {metric: mean([1.0 if e[f] else 0.0 for e in kept]) for metric, f in fields.items()}


# -- viggo -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MeaningRepresentation:
    """A parsed ViGGO MR: `function(attr[value], ...)`. `trailing` is any text after the closing paren."""

    function: str
    attributes: tuple[tuple[str, str], ...]
    trailing: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {"function": self.function, "attributes": [list(a) for a in self.attributes]}


class MRParseError(ValueError):
    """The text is not a `function(attr[value], ...)` meaning representation; the message says where."""


_FUNCTION = re.compile(r"([A-Za-z_]\w*)\s*\(")
_ATTRIBUTE = re.compile(r"([A-Za-z_]\w*)\s*\[")


def parse_mr(text: str) -> MeaningRepresentation:
    """Parse `function(attr[value], ...)`, bracket-aware.

    Values may hold commas, apostrophes and parentheses (`genres[action-adventure, shooter]`,
    `esrb[M (for Mature)]`): a value runs to its matching `]`, so only brackets are structural inside
    it. The MR must start the text (after whitespace); it ends at its closing `)`, and any text after
    that is returned in `trailing` rather than failing the parse (models often run on past the MR).
    Values are whitespace-normalised but keep their case: ViGGO values are names and case-meaningful.
    """
    s = text.strip()
    match = _FUNCTION.match(s)
    if not match:
        raise MRParseError(f"does not start with 'function(': {_excerpt(s, 0)}")
    function, i, n = match.group(1), match.end(), len(s)
    attributes: list[tuple[str, str]] = []
    while True:
        i = _skip_ws(s, i)
        if i >= n:
            raise MRParseError(f"'{function}(' is never closed")
        if s[i] == ")" and not attributes:
            i += 1
            break
        attr = _ATTRIBUTE.match(s, i)
        if not attr:
            raise MRParseError(f"expected attribute[value] at character {i}: {_excerpt(s, i)}")
        end = _matching_bracket(s, attr.end() - 1)
        if end < 0:
            raise MRParseError(f"attribute {attr.group(1)!r}: '[' is never closed")
        attributes.append((attr.group(1), normalize_ws(s[attr.end():end])))
        i = _skip_ws(s, end + 1)
        if i < n and s[i] == ",":
            i += 1
            continue
        if i < n and s[i] == ")":
            i += 1
            break
        raise MRParseError(f"expected ',' or ')' after attribute {attr.group(1)!r} at character {i}: "
                           f"{_excerpt(s, i)}" if i < n else f"'{function}(' is never closed")
    return MeaningRepresentation(function, tuple(attributes), s[i:].strip())


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i].isspace():
        i += 1
    return i


def _matching_bracket(s: str, open_at: int) -> int:
    """Index of the `]` closing the `[` at `open_at`, counting nested brackets; -1 if unclosed."""
    depth = 0
    for j in range(open_at, len(s)):
        if s[j] == "[":
            depth += 1
        elif s[j] == "]":
            depth -= 1
            if depth == 0:
                return j
    return -1


def _excerpt(s: str, i: int, width: int = 30) -> str:
    part = s[i:i + width]
    return repr(part + ("..." if len(s) > i + width else ""))


@register("viggo")
def viggo(predictions: Sequence[str], golds: Sequence[str], rows: Sequence[Mapping[str, Any]],
          options: Mapping[str, Any]) -> Scored:
    """ViGGO meaning representations: function, attribute set and (order-sensitive) exact match.

    - functionAccuracy: same dialogue-act function;
    - attributeSetAccuracy: the same set of attribute names (regardless of function or values);
    - exactMatchUnordered: same function and the same attribute-value pairs, in any order;
    - exactMatch (primary): same function and the same (attribute, value) sequence: attribute order
      matters in ViGGO, which is part of what the fine-tuned model learns;
    - parseRate: predictions that parse as an MR at all.
    Values compare after whitespace normalisation and keep their case. A prediction that does not parse
    scores 0 on everything (`parseError` says why); text after the MR's closing paren is ignored (counted
    in the notes). An example whose gold does not parse is dropped.
    """
    def one(entry: dict[str, Any], prediction: str, gold: str, row: Mapping[str, Any]) -> None:
        try:
            ref = parse_mr(gold)
        except MRParseError:
            entry["dropped"] = "gold MR does not parse"
            return
        check_length(prediction)
        try:
            mr = parse_mr(prediction)
        except MRParseError as exc:
            entry["parseError"] = str(exc)
            return
        entry["parsedPrediction"] = mr.to_wire()
        if mr.trailing:
            entry["trailingText"] = mr.trailing
        same_function = mr.function == ref.function
        entry["functionMatch"] = same_function
        entry["attributeSetMatch"] = {a for a, _ in mr.attributes} == {a for a, _ in ref.attributes}
        entry["exactMatchUnordered"] = same_function and Counter(mr.attributes) == Counter(ref.attributes)
        entry["exactMatch"] = same_function and mr.attributes == ref.attributes
        entry["score"] = 1.0 if entry["exactMatch"] else 0.0

    per_example = each(predictions, golds, rows, {
        "parsedPrediction": None, "parseError": None, "functionMatch": False, "attributeSetMatch": False,
        "exactMatchUnordered": False, "exactMatch": False}, one)
    unparsed = sum(e["parseError"] is not None for e in per_example)
    trailing = sum("trailingText" in e for e in per_example)
    kept = [e for e in per_example if e["dropped"] is None]
    metrics = accuracies(per_example, {"exactMatch": "exactMatch", "exactMatchUnordered": "exactMatchUnordered",
                                       "functionAccuracy": "functionMatch",
                                       "attributeSetAccuracy": "attributeSetMatch"})
    if kept:
        metrics["parseRate"] = mean([0.0 if e["parseError"] or e["failure"] else 1.0 for e in kept])
    notes = dropped_note([e["dropped"] for e in per_example])
    if unparsed:
        notes.append(f"{unparsed} prediction(s) did not parse as an MR and scored 0")
    if trailing:
        notes.append(f"{trailing} prediction(s) had text after the MR's closing parenthesis (ignored)")
    return Scored(metrics, per_example, "exactMatch", len(kept), len(per_example) - len(kept), notes)


# -- gsm8k -----------------------------------------------------------------------------------------------

# A number as GSM8K writes them: optional sign (not a minus between two operands, as in '5-3') and `$`,
# thousands separators, decimals. The look-behind keeps it from starting inside a word or another number.
_NUMBER = re.compile(
    r"(?<![\w.,])(?P<sign>(?<![\w)\]])[-−])?\s?\$?\s?(?P<sign2>[-−])?"
    r"(?P<digits>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
)


MAX_ANSWER_DIGITS = 100
"""An extracted gsm8k answer with more digits is not compared (`numberTooLong`); GSM8K's have a few."""


def _to_number(match: re.Match[str]) -> str:
    """The canonical text of a matched number: '1,000' -> '1000', '72.0' -> '72', '-$5' -> '-5', '.50' ->
    '0.5'. Text, never int or float: exact for any length (int() refuses over 4,300 digits)."""
    integer, _, fraction = match.group("digits").replace(",", "").partition(".")
    text = integer.lstrip("0") or "0"
    fraction = fraction.rstrip("0")
    if fraction:
        text += "." + fraction
    negative = match.group("sign") or match.group("sign2")
    return "-" + text if negative and text != "0" else text


def _digits(number: str | None) -> int:
    return 0 if number is None else sum(ch.isdigit() for ch in number)


def extract_gsm8k(text: str) -> tuple[str | None, str | None]:
    """(strict, lenient) answers of a GSM8K solution, as canonical number strings (or None).

    Strict: the first number after the LAST `####`. Lenient: the strict answer when there is one, else
    the last number anywhere in the text (few-shot baselines that answer in prose). Canonical strings are
    equal exactly when the numbers are: `72` == `72.0`, `1,000` == `1000`, `$5` == `5`.
    """
    strict = None
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        first = _NUMBER.search(tail)
        strict = _to_number(first) if first else None
    if strict is not None:
        return strict, strict
    numbers = list(_NUMBER.finditer(text))
    return None, _to_number(numbers[-1]) if numbers else None


@register("gsm8k")
def gsm8k(predictions: Sequence[str], golds: Sequence[str], rows: Sequence[Mapping[str, Any]],
          options: Mapping[str, Any]) -> Scored:
    """GSM8K: `accuracy` (primary) on the number after the last `####`; `lenientAccuracy` also accepts the
    last number in free text. Gold answers are read the same way (a bare number works too); an example whose
    gold holds no number is dropped. Predictions scored only by the lenient path are counted in the notes.
    """
    def one(entry: dict[str, Any], prediction: str, gold: str, row: Mapping[str, Any]) -> None:
        gold_strict, gold_lenient = extract_gsm8k(gold)
        answer = gold_strict or gold_lenient
        entry["gold"] = answer
        if answer is None:
            entry["dropped"] = "gold has no number"
            return
        if _digits(answer) > MAX_ANSWER_DIGITS:
            entry["dropped"] = "gold number too long"
            return
        check_length(prediction)
        strict, lenient = extract_gsm8k(prediction)
        if max(_digits(strict), _digits(lenient)) > MAX_ANSWER_DIGITS:
            raise Unscorable(Failure.NUMBER_TOO_LONG)
        entry.update(extracted=strict, extractedLenient=lenient, lenient=strict is None and lenient is not None,
                     correct=strict == answer, correctLenient=lenient == answer)
        entry["score"] = 1.0 if entry["correct"] else 0.0

    per_example = each(predictions, golds, rows, {"gold": None, "extracted": None, "extractedLenient": None,
                                                  "lenient": False, "correct": False, "correctLenient": False},
                       one)
    lenient_only = sum(e["dropped"] is None and e["lenient"] for e in per_example)
    kept = sum(e["dropped"] is None for e in per_example)
    metrics = accuracies(per_example, {"accuracy": "correct", "lenientAccuracy": "correctLenient"})
    notes = dropped_note([e["dropped"] for e in per_example])
    if lenient_only:
        notes.append(f"lenient: {lenient_only} prediction(s) had no '#### <number>' answer and count only in "
                     "lenientAccuracy (last number in free text)")
    return Scored(metrics, per_example, "accuracy", kept, len(per_example) - kept, notes)


# -- sqlExecution ----------------------------------------------------------------------------------------


@register("sqlExecution", options=("dialect", "contextField", "rowsPerTable", "databases", "seed",
                                   "timeoutSeconds", "memoryLimitMiB"))
def sql_execution(predictions: Sequence[str], golds: Sequence[str], rows: Sequence[Mapping[str, Any]],
                  options: Mapping[str, Any]) -> Scored:
    """Test-suite execution match: the prediction must return the gold's result on every database of a
    suite generated from each row's `CREATE TABLE` context and shaped by its gold query.

    See `kubetune.serving.sqlexec` for how results compare and queries are sandboxed, and
    `kubetune.serving.sqlfuzz` for how the databases are filled. Options: `dialect` (sqlglot dialect the
    queries are written in, default sqlite), `contextField` (the row field holding the CREATE TABLE
    statements, default context), `rowsPerTable` (default 20), `databases` (per example, default 8, at
    most 16), `seed` (default 0), `timeoutSeconds` (per query, default 2), `memoryLimitMiB` (per worker
    process, default 256).
    """
    from kubetune.serving import sqlexec

    field_name = str(options.get("contextField", "context"))
    defaults = sqlexec.Settings()
    settings = sqlexec.Settings(
        dialect=sqlexec.check_dialect(str(options.get("dialect", "sqlite"))),
        rows_per_table=int_option(options, "rowsPerTable", defaults.rows_per_table, 3, 1000),
        databases=int_option(options, "databases", defaults.databases, 1, sqlexec.MAX_DATABASES),
        seed=int_option(options, "seed", 0, 0, 2**31),
        max_seconds=int_option(options, "timeoutSeconds", int(defaults.max_seconds), 1, 60),
        memory_bytes=int_option(options, "memoryLimitMiB", defaults.memory_bytes >> 20, 128, 16_384) << 20)
    examples: list[sqlexec.Example] = []
    too_long: set[int] = set()
    for i, (prediction, gold, row) in enumerate(zip(predictions, golds, rows, strict=True)):
        if len(prediction) > MAX_PREDICTION_CHARS:
            too_long.add(i)
            prediction = ""  # the gold side is still judged: a dropped example stays dropped
        examples.append((prediction, gold, _context(row, field_name)))
    per_example = sqlexec.score_examples(examples, settings)
    for i in too_long:
        if per_example[i]["dropped"] is None:
            per_example[i].update(score=0.0, correct=False, error=None, executed=None, predictedRows=None,
                                  failure=Failure.PREDICTION_TOO_LONG)
    kept = sum(e["dropped"] is None for e in per_example)
    metrics = accuracies(per_example, {"executionAccuracy": "correct"})
    notes = dropped_note([e["dropped"] for e in per_example])
    return Scored(metrics, per_example, "executionAccuracy", kept, len(per_example) - kept, notes)


def _context(row: Mapping[str, Any], field_name: str) -> str:
    value = row.get(field_name)
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


# -- exactMatch, chrf, bleu ------------------------------------------------------------------------------


@register("exactMatch", options=("caseSensitive",))
def exact_match(predictions: Sequence[str], golds: Sequence[str], rows: Sequence[Mapping[str, Any]],
                options: Mapping[str, Any]) -> Scored:
    """Whitespace-normalised string equality; option `caseSensitive` (default true)."""
    case_sensitive = bool_option(options, "caseSensitive", True)

    def norm(text: str) -> str:
        text = normalize_ws(text)
        return text if case_sensitive else text.casefold()

    def one(entry: dict[str, Any], prediction: str, gold: str, row: Mapping[str, Any]) -> None:
        check_length(prediction)
        entry["exactMatch"] = norm(prediction) == norm(gold)
        entry["score"] = 1.0 if entry["exactMatch"] else 0.0

    per_example = each(predictions, golds, rows, {"exactMatch": False}, one)
    metrics = accuracies(per_example, {"exactMatch": "exactMatch"})
    notes = [] if case_sensitive else ["case-insensitive"]
    return Scored(metrics, per_example, "exactMatch", len(per_example), 0, notes)


@register("chrf", options=("wordOrder",))
def chrf(predictions: Sequence[str], golds: Sequence[str], rows: Sequence[Mapping[str, Any]],
         options: Mapping[str, Any]) -> Scored:
    """sacrebleu corpus chrF (0..100); per example the sentence chrF scaled to 0..1.

    Option `wordOrder` (default 0; 2 gives chrF++).
    """
    from sacrebleu.metrics.chrf import CHRF

    word_order = int_option(options, "wordOrder", 0, 0, 2)
    metric = CHRF(word_order=word_order)
    return _sacrebleu(metric, metric, "chrf", predictions, golds, ["chrF++"] if word_order == 2 else [])


@register("bleu", options=("tokenize", "lowercase"))
def bleu(predictions: Sequence[str], golds: Sequence[str], rows: Sequence[Mapping[str, Any]],
         options: Mapping[str, Any]) -> Scored:
    """sacrebleu corpus BLEU (0..100); per example the sentence BLEU (effective order) scaled to 0..1.

    Options `tokenize` (sacrebleu tokenizer, default 13a) and `lowercase` (default false).
    """
    from sacrebleu.metrics.bleu import BLEU

    tokenize = str(options.get("tokenize", "13a"))
    if tokenize not in BLEU.TOKENIZERS:
        raise ValueError(f"option tokenize: {tokenize!r} is not one of {', '.join(BLEU.TOKENIZERS)}")
    lowercase = bool_option(options, "lowercase", False)
    corpus = BLEU(tokenize=tokenize, lowercase=lowercase)
    sentence = BLEU(tokenize=tokenize, lowercase=lowercase, effective_order=True)
    return _sacrebleu(corpus, sentence, "bleu", predictions, golds, [])


def _sacrebleu(corpus: Any, sentence: Any, name: str, predictions: Sequence[str], golds: Sequence[str],
               notes: list[str]) -> Scored:
    def one(entry: dict[str, Any], prediction: str, gold: str, row: Mapping[str, Any]) -> None:
        check_length(prediction)
        entry["score"] = sentence.sentence_score(prediction.strip(), [gold.strip()]).score / 100

    per_example = each(predictions, golds, [{}] * len(golds), {}, one)
    # A prediction that could not be scored counts in the corpus score as an empty hypothesis.
    hypotheses = ["" if e["failure"] else p.strip() for p, e in zip(predictions, per_example, strict=True)]
    references = [g.strip() for g in golds]
    metrics = {name: float(corpus.corpus_score(hypotheses, [references]).score)} if hypotheses else {}
    return Scored(metrics, per_example, name, len(per_example), 0, notes)
