"""The evaluation scorers, as specifications: what counts as right, what is dropped, what each metric means.

Real ViGGO and GSM8K data (../shared/datasets, skipped where absent) must score full marks against itself;
every other case is written out here. The SQL cases are in sql-create-context's style (CREATE TABLE
context without data, gold query) and run on the tables the scorer generates.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from kubetune.api.evaluation import ScorerName
from kubetune.contract.evalplan import DEFAULT_METRICS
from kubetune.serving import sqlexec
from kubetune.serving.scorers import (
    SCORERS,
    MRParseError,
    Scored,
    check_options,
    extract_gsm8k,
    parse_mr,
    score,
)
from support import shared

REPO = Path(__file__).resolve().parents[2]


def dataset(relative: str) -> Path:
    """A real dataset file from ../shared/datasets: skipped with the reason where absent, failed under CI=true."""
    return shared.require(shared.DATASETS / relative, "real datasets are not scored")


def one(name: str, prediction: str, gold: str, row: dict[str, str] | None = None,
        options: dict[str, str] | None = None) -> Scored:
    return score(name, [prediction], [gold], [row or {}], options)


# -- registry --------------------------------------------------------------------------------------------


def test_the_scorers_are_exactly_those_the_evaljob_api_accepts() -> None:
    assert set(SCORERS) == set(typing.get_args(ScorerName))


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_each_scorers_primary_metric_is_the_gates_default(name: str) -> None:
    scored = score(name, ["inform(name[a]) #### 1"], ["inform(name[a]) #### 1"], [{"context": "CREATE TABLE t (a)"}])
    assert scored.primary == DEFAULT_METRICS[name]


def test_an_unknown_scorer_is_a_value_error_listing_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown scorer 'rouge'.*bleu, chrf, exactMatch, gsm8k, sqlExecution, viggo"):
        score("rouge", ["a"], ["a"])


def test_an_option_the_scorer_does_not_know_is_a_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match="'casesensitive'.*caseSensitive"):
        check_options("exactMatch", {"casesensitive": "false"})


def test_predictions_and_references_of_different_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score("exactMatch", ["a", "b"], ["a"])


def test_no_examples_give_no_metrics_rather_than_a_made_up_score() -> None:
    scored = score("viggo", [], [])
    assert (scored.metrics, scored.kept, scored.per_example) == ({}, 0, [])


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_every_scorers_per_example_details_are_json_serialisable(name: str) -> None:
    scored = score(name, ["inform(name[a])", "#### 4"], ["inform(name[b])", "SELECT a FROM t WHERE a > 2"],
                   [{"context": "CREATE TABLE t (a REAL)"}] * 2)
    assert json.loads(json.dumps(scored.per_example)) == scored.per_example


def test_importing_the_scorers_loads_no_ml_framework_nor_the_heavy_scoring_libraries() -> None:
    code = ("import sys, kubetune.serving.scorers; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray', 'kopf', 'sqlglot', 'sacrebleu'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


# -- viggo -----------------------------------------------------------------------------------------------

GOLD_MR = "give_opinion(name[SpellForce 3], release_year[2017], developer[Grimlore Games], rating[poor])"
VIGGO_METRICS = ("exactMatch", "exactMatchUnordered", "functionAccuracy", "attributeSetAccuracy")


def viggo_metrics(prediction: str, gold: str = GOLD_MR) -> tuple[float, ...]:
    metrics = one("viggo", prediction, gold).metrics
    return tuple(metrics[m] for m in VIGGO_METRICS)


@pytest.mark.parametrize("split", ["valid.csv", "train.csv"])
def test_every_real_viggo_meaning_representation_parses_and_scores_full_marks_against_itself(split: str) -> None:
    with dataset(f"viggo/{split}").open(newline="") as f:
        mrs = [row["mr"] for row in csv.DictReader(f)]
    scored = score("viggo", mrs, mrs)
    assert (scored.kept, scored.dropped) == (len(mrs), 0)
    assert scored.metrics == {m: 1.0 for m in (*VIGGO_METRICS, "parseRate")}


def test_viggo_values_may_hold_commas_apostrophes_and_parentheses() -> None:
    mr = parse_mr("inform(name[Tony Hawk's Pro Skater 3], esrb[M (for Mature)], "
                  "genres[action-adventure, role-playing, shooter], platforms[])")
    assert mr.function == "inform"
    assert mr.attributes == (("name", "Tony Hawk's Pro Skater 3"), ("esrb", "M (for Mature)"),
                             ("genres", "action-adventure, role-playing, shooter"), ("platforms", ""))


def test_viggo_attribute_order_matters_only_to_exact_match() -> None:
    swapped = "give_opinion(name[SpellForce 3], developer[Grimlore Games], release_year[2017], rating[poor])"
    assert viggo_metrics(swapped) == (0.0, 1.0, 1.0, 1.0)


def test_viggo_wrong_function_fails_function_accuracy_and_exact_match() -> None:
    wrong = GOLD_MR.replace("give_opinion", "inform")
    assert viggo_metrics(wrong) == (0.0, 0.0, 0.0, 1.0)


def test_viggo_missing_attribute_fails_the_attribute_set() -> None:
    missing = "give_opinion(name[SpellForce 3], release_year[2017], rating[poor])"
    assert viggo_metrics(missing) == (0.0, 0.0, 1.0, 0.0)


def test_viggo_wrong_value_keeps_the_attribute_set_but_fails_both_exact_matches() -> None:
    wrong = GOLD_MR.replace("rating[poor]", "rating[good]")
    assert viggo_metrics(wrong) == (0.0, 0.0, 1.0, 1.0)


def test_viggo_values_compare_whitespace_normalised_but_case_sensitive() -> None:
    spaced = "give_opinion( name[ SpellForce   3 ],release_year[2017] , developer[Grimlore Games], rating[poor] )"
    assert viggo_metrics(spaced) == (1.0, 1.0, 1.0, 1.0)
    assert viggo_metrics(GOLD_MR.replace("SpellForce", "spellforce"))[0] == 0.0


def test_an_unparseable_viggo_prediction_scores_zero_everywhere_and_says_why() -> None:
    scored = one("viggo", "give_opinion(name[SpellForce 3], rating[poor]", GOLD_MR)
    assert all(scored.metrics[m] == 0.0 for m in VIGGO_METRICS)
    assert scored.metrics["parseRate"] == 0.0
    assert "never closed" in scored.per_example[0]["parseError"]
    assert scored.per_example[0]["parsedPrediction"] is None


@pytest.mark.parametrize("text", ["The game is great.", "name[SpellForce 3]", "inform(name[a] rating[b])",
                                  "inform(name[a], )", ""])
def test_text_that_is_not_function_of_attributes_does_not_parse(text: str) -> None:
    with pytest.raises(MRParseError):
        parse_mr(text)


def test_viggo_text_after_the_closing_parenthesis_is_ignored_and_noted() -> None:
    scored = one("viggo", GOLD_MR + " <END> inform(name[Other])", GOLD_MR)
    assert scored.metrics["exactMatch"] == 1.0
    assert scored.per_example[0]["trailingText"] == "<END> inform(name[Other])"
    assert any("after the MR" in note for note in scored.notes)


def test_a_viggo_example_whose_gold_does_not_parse_is_dropped() -> None:
    scored = score("viggo", [GOLD_MR, GOLD_MR], ["not an MR", GOLD_MR])
    assert (scored.kept, scored.dropped, scored.per_example[0]["dropped"]) == (1, 1, "gold MR does not parse")


# -- gsm8k -----------------------------------------------------------------------------------------------


def test_every_real_gsm8k_answer_scores_full_marks_against_itself_with_its_final_number_extracted() -> None:
    with dataset("gsm8k/train.jsonl").open() as f:
        answers = [json.loads(line)["answer"] for line in f]
    scored = score("gsm8k", answers, answers)
    assert (scored.kept, scored.dropped) == (len(answers), 0)
    assert scored.metrics == {"accuracy": 1.0, "lenientAccuracy": 1.0}
    finals = [a.rsplit("####", 1)[1].strip().replace(",", "") for a in answers]
    assert [e["extracted"] for e in scored.per_example] == finals


def test_gsm8k_wrong_number_scores_zero() -> None:
    scored = one("gsm8k", "48 + 24 = 71\n#### 71", "#### 72")
    assert scored.metrics == {"accuracy": 0.0, "lenientAccuracy": 0.0}


def test_gsm8k_thousands_separators_do_not_matter() -> None:
    assert one("gsm8k", "#### 1,000", "so #### 1000").metrics["accuracy"] == 1.0


def test_gsm8k_numbers_compare_by_value() -> None:
    assert one("gsm8k", "#### $72.00", "#### 72").metrics["accuracy"] == 1.0


def test_gsm8k_free_text_answer_counts_only_leniently_and_is_flagged() -> None:
    scored = one("gsm8k", "48 + 24 = 72, so the answer is 72.", "#### 72")
    assert scored.metrics == {"accuracy": 0.0, "lenientAccuracy": 1.0}
    entry = scored.per_example[0]
    assert (entry["extracted"], entry["extractedLenient"], entry["lenient"]) == (None, "72", True)
    assert any(note.startswith("lenient: 1 prediction") for note in scored.notes)


def test_gsm8k_takes_the_number_after_the_last_marker() -> None:
    scored = one("gsm8k", "#### 12\nWait, I forgot the tip.\n#### 15", "#### 15")
    assert (scored.metrics["accuracy"], scored.per_example[0]["extracted"]) == (1.0, "15")


@pytest.mark.parametrize(("text", "expected"), [
    ("#### -7", ("-7", "-7")),
    ("she lost -$5 in total", (None, "-5")),
    ("5-3=2", (None, "2")),
    ("#### 0.50", ("0.5", "0.5")),
    ("#### twelve, not 11", ("11", "11")),
    ("no digits here", (None, None)),
])
def test_gsm8k_extraction_reads_signs_currency_and_decimals(text: str, expected: tuple[str | None, ...]) -> None:
    assert extract_gsm8k(text) == expected


def test_a_gsm8k_example_whose_gold_has_no_number_is_dropped() -> None:
    scored = score("gsm8k", ["#### 1", "#### 2"], ["#### none", "#### 2"])
    assert (scored.kept, scored.dropped, scored.metrics["accuracy"]) == (1, 1, 1.0)


# -- sqlExecution ----------------------------------------------------------------------------------------

HEAD = {"question": "How many heads of the departments are older than 56 ?", "context": "CREATE TABLE head (age INTEGER)"}
PEOPLE = {"question": "Names of people younger than 30", "context": "CREATE TABLE people (name VARCHAR, age INTEGER)"}

# (context, gold, a differently written prediction with the same result), in sql-create-context's style.
SQL_CREATE_CONTEXT = [
    ("CREATE TABLE head (age INTEGER)",
     "SELECT COUNT(*) FROM head WHERE age > 56",
     "select count(*) from head as h where h.age > 56"),
    ("CREATE TABLE head (name VARCHAR, born_state VARCHAR, age VARCHAR)",
     "SELECT name FROM head WHERE born_state <> 'California'",
     "SELECT h.name FROM head h WHERE NOT h.born_state = 'California'"),
    ("CREATE TABLE department (num_employees INTEGER, ranking INTEGER)",
     "SELECT AVG(num_employees) FROM department WHERE ranking BETWEEN 10 AND 15",
     "SELECT avg(num_employees) FROM department WHERE ranking >= 10 AND ranking <= 15"),
    ("CREATE TABLE management (head_id VARCHAR, temporary_acting VARCHAR); "
     + "CREATE TABLE head (name VARCHAR, head_id VARCHAR)",
     'SELECT T1.name FROM head AS T1 JOIN management AS T2 ON T1.head_id = T2.head_id '
     + 'WHERE T2.temporary_acting = "Yes"',
     "SELECT head.name FROM management, head WHERE management.head_id = head.head_id "
     + "AND management.temporary_acting = 'Yes'"),
    ("CREATE TABLE table_name_61 (venue VARCHAR, date VARCHAR)",
     'SELECT venue FROM table_name_61 WHERE date = "20 october 1990"',
     "SELECT venue FROM table_name_61 WHERE date = '20 october 1990'"),
    ("CREATE TABLE table_name_50 (crowd INTEGER, away_team VARCHAR)",
     'SELECT MAX(crowd) FROM table_name_50 WHERE away_team = "carlton"',
     "SELECT crowd FROM table_name_50 WHERE away_team = 'carlton' ORDER BY crowd DESC LIMIT 1"),
    ("CREATE TABLE city (Status VARCHAR)",
     "SELECT Status, COUNT(*) FROM city GROUP BY Status",
     "SELECT status, count(*) AS n FROM city GROUP BY status ORDER BY n"),
    ("CREATE TABLE head (name VARCHAR, head_id VARCHAR); CREATE TABLE management (head_id VARCHAR)",
     "SELECT name FROM head WHERE NOT head_id IN (SELECT head_id FROM management)",
     "SELECT h.name FROM head h LEFT JOIN management m ON h.head_id = m.head_id WHERE m.head_id IS NULL"),
    ("CREATE TABLE Products (product_name VARCHAR, product_price INTEGER)",
     "SELECT product_name FROM Products WHERE product_name LIKE '%Dining%' AND product_price < 1000",
     "SELECT product_name FROM products WHERE instr(product_name, 'Dining') > 0 AND NOT product_price >= 1000"),
]


def sql(golds: list[str], predictions: list[str], contexts: list[str], **options: str) -> Scored:
    return score("sqlExecution", predictions, golds, [{"context": c} for c in contexts], options)


@pytest.mark.parametrize(("context", "gold", "prediction"), SQL_CREATE_CONTEXT,
                         ids=[g.split(" FROM ")[1][:30] for _, g, _ in SQL_CREATE_CONTEXT])
def test_sql_a_correct_query_written_differently_scores_one(context: str, gold: str, prediction: str) -> None:
    scored = sql([gold], [prediction], [context])
    assert scored.per_example[0]["error"] is None
    assert (scored.kept, scored.metrics) == (1, {"executionAccuracy": 1.0})


def test_sql_generated_tables_make_every_realistic_gold_return_something() -> None:
    contexts, golds, _ = zip(*SQL_CREATE_CONTEXT, strict=True)
    scored = sql(list(golds), list(golds), list(contexts))
    assert [e["dropped"] for e in scored.per_example] == [None] * len(golds)
    assert all(e["goldRows"][0] > 0 for e in scored.per_example)  # database 0: rows_per_table rows per table
    assert [e["databases"] for e in scored.per_example] == [8] * len(golds)


def test_sql_a_wrong_where_clause_scores_zero() -> None:
    scored = sql(["SELECT name FROM people WHERE age < 30"], ["SELECT name FROM people WHERE age > 30"],
                 [PEOPLE["context"]])
    assert (scored.kept, scored.metrics) == (1, {"executionAccuracy": 0.0})


def test_sql_columns_compare_by_position() -> None:
    scored = sql(["SELECT name, age FROM people WHERE age < 30"], ["SELECT age, name FROM people WHERE age < 30"],
                 [PEOPLE["context"]])
    assert scored.metrics["executionAccuracy"] == 0.0


def test_sql_row_order_matters_only_when_the_gold_query_orders() -> None:
    gold = "SELECT name FROM people WHERE age < 30 ORDER BY age DESC"
    scored = sql([gold, gold.replace(" ORDER BY age DESC", "")],
                 ["SELECT name FROM people WHERE age < 30 ORDER BY age ASC"] * 2, [PEOPLE["context"]] * 2)
    assert [e["ordered"] for e in scored.per_example] == [True, False]
    assert [e["score"] for e in scored.per_example] == [0.0, 1.0]


def test_sql_golds_that_cannot_tell_right_from_wrong_are_dropped_and_counted() -> None:
    golds = ["SELECT name FROM people WHERE age > 60 AND age < 50",  # empty on every database
             "SELECT name FROM people LIMIT 1",  # which row comes first is the storage's choice
             "SELECT height FROM people",  # fails: no such column
             "SELECT * FROM people",  # the whole table: a fine gold
             "SELECT name FROM people WHERE age < 30"]
    scored = sql(golds, ["SELECT name FROM people"] * 5, [PEOPLE["context"]] * 5)
    assert [e["dropped"] for e in scored.per_example] == [
        "gold result empty on every database", "gold result depends on row order", "gold fails to execute",
        None, None]
    assert (scored.kept, scored.dropped) == (2, 3)
    assert "3 examples dropped: gold result empty on every database (1), gold result depends on row order (1), " \
           "gold fails to execute (1)" in scored.notes


def test_sql_a_where_that_keeps_every_row_of_one_database_still_counts_on_another() -> None:
    # The old single database had no NULLs: dropping `age IS NOT NULL` changed nothing, so it dropped
    # such golds. The suite has NULLs, and tells the two apart.
    golds = ["SELECT name FROM people WHERE age IS NOT NULL", "SELECT name FROM people ORDER BY age"]
    scored = sql(golds, ["SELECT name FROM people"] * 2, [PEOPLE["context"]] * 2)
    assert [e["dropped"] for e in scored.per_example] == [None, None]
    assert [e["score"] for e in scored.per_example] == [0.0, 0.0]  # the second: unordered where order counts


def test_sql_a_prediction_stops_at_the_first_database_whose_result_differs() -> None:
    scored = sql(["SELECT name FROM people WHERE age < 30"] * 2,
                 ["SELECT name FROM people WHERE age < 30", "SELECT name FROM people WHERE age <= 30"],
                 [PEOPLE["context"]] * 2)
    right, wrong = scored.per_example
    assert (right["mismatch"], len(right["predictedRows"]), right["score"]) == (None, right["databases"], 1.0)
    assert wrong["score"] == 0.0
    assert len(wrong["predictedRows"]) == wrong["mismatch"] + 1 <= wrong["databases"]
    assert wrong["predictedRows"][:-1] == wrong["goldRows"][:wrong["mismatch"]]


def test_sql_a_cached_suite_is_never_served_for_other_settings_and_gives_the_same_entries() -> None:
    gold, context = "SELECT name FROM people WHERE age < 30", PEOPLE["context"]
    settings = sqlexec.Settings()
    sqlexec.clear_suite_cache()
    first = sqlexec.score_example(gold, gold, context, settings)
    again = sqlexec.score_example(gold, gold, context, settings)  # from the cache
    other = sqlexec.score_example(gold, gold, context, sqlexec.Settings(seed=1))
    sqlexec.clear_suite_cache()
    fresh = sqlexec.score_example(gold, gold, context, settings)
    assert first == again == fresh
    assert other["goldRows"] != first["goldRows"]


# Real Spider golds (CC BY-SA 4.0) and wrong variants that the single database of the old scorer called
# right: one matching row (AVG = SUM, MIN = MAX), no violating row (WHERE removed), every key with a
# partner (join condition dropped), no duplicates (DISTINCT dropped).
CARS = ("CREATE TABLE cars_data (Id INTEGER, MPG TEXT, Cylinders INTEGER, Edispl INTEGER, Horsepower TEXT, "
        "Weight INTEGER, Accelerate INTEGER, Year INTEGER)")
WORLD = ("CREATE TABLE country (Code TEXT, Name TEXT, Continent TEXT, Region TEXT, SurfaceArea INTEGER, IndepYear "
         "INTEGER, Population INTEGER, LifeExpectancy INTEGER, GovernmentForm TEXT); CREATE TABLE countrylanguage "
         "(CountryCode TEXT, Language TEXT, IsOfficial TEXT, Percentage INTEGER)")
SPIDER_WRONG = [
    (CARS, "SELECT avg(mpg) FROM CARS_DATA WHERE Cylinders  =  4;", "SELECT SUM(mpg) FROM CARS_DATA WHERE Cylinders = 4"),
    (CARS, "SELECT avg(mpg) FROM CARS_DATA WHERE Cylinders  =  4;", "SELECT AVG(mpg) FROM CARS_DATA"),
    (CARS, "select min(weight) from cars_data where cylinders  =  8 and year  =  1974",
     "select min(weight) from cars_data where cylinders = 8"),
    (WORLD, ('SELECT CountryCode ,  max(Percentage) FROM countrylanguage WHERE LANGUAGE  =  "Spanish" '
             "GROUP BY CountryCode"),
     "SELECT CountryCode, MIN(Percentage) FROM countrylanguage WHERE LANGUAGE = 'Spanish' GROUP BY CountryCode"),
    (WORLD, 'SELECT count(DISTINCT GovernmentForm) FROM country WHERE Continent  =  "Africa"',
     "SELECT COUNT(GovernmentForm) FROM country WHERE Continent = 'Africa'"),
    (WORLD, ('SELECT T1.Name FROM country AS T1 JOIN countrylanguage AS T2 ON T1.Code  =  T2.CountryCode '
             'WHERE T2.Language  =  "English" INTERSECT SELECT T1.Name FROM country AS T1 JOIN countrylanguage AS '
             'T2 ON T1.Code  =  T2.CountryCode WHERE T2.Language  =  "French"'),
     ("SELECT T1.Name FROM country AS T1, countrylanguage AS T2 WHERE T2.Language = 'English' INTERSECT "
      "SELECT T1.Name FROM country AS T1 JOIN countrylanguage AS T2 ON T1.Code = T2.CountryCode "
      "WHERE T2.Language = 'French'")),
]


@pytest.mark.parametrize(("context", "gold", "wrong"), SPIDER_WRONG, ids=[w[:40] for _, _, w in SPIDER_WRONG])
def test_sql_wrong_variants_of_real_golds_score_zero_and_the_golds_one(context: str, gold: str, wrong: str) -> None:
    rewritten = re.sub(r"\b(SELECT|FROM|WHERE|JOIN|GROUP BY|INTERSECT|AS|ON|AND)\b", lambda m: m[0].lower(),
                       gold).replace("  ", "\n ")  # keywords' case and whitespace: still right
    scored = sql([gold] * 3, [gold, rewritten, wrong], [context] * 3)
    assert [e["dropped"] for e in scored.per_example] == [None] * 3
    assert [e["score"] for e in scored.per_example] == [1.0, 1.0, 0.0]


def test_sql_invalid_prediction_scores_zero_with_the_error() -> None:
    scored = sql(["SELECT COUNT(*) FROM head WHERE age > 56"], ["SELECT COUNT(*) FORM head WHERE age > 56"],
                 [HEAD["context"]])
    assert scored.metrics == {"executionAccuracy": 0.0}
    assert "syntax error" in scored.per_example[0]["error"]


@pytest.mark.parametrize("prediction", ["", "I don't know.", "(" * 3000 + "1", "SELECT * FROM nowhere"],
                         ids=["empty", "prose", "deeply-nested", "unknown-table"])
def test_sql_any_unusable_prediction_scores_zero_with_an_error_rather_than_raising(prediction: str) -> None:
    scored = sql(["SELECT COUNT(*) FROM head WHERE age > 56"], [prediction], [HEAD["context"]])
    assert scored.metrics == {"executionAccuracy": 0.0}
    assert scored.per_example[0]["error"]


def test_sql_a_prediction_that_is_not_a_query_is_refused_without_running() -> None:
    scored = sql(["SELECT COUNT(*) FROM head WHERE age > 56"], ["DROP TABLE head"], [HEAD["context"]])
    assert scored.per_example[0]["error"] == "not a query: DROP statement"


def test_sql_a_runaway_prediction_is_stopped_and_scores_zero() -> None:
    endless = "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT COUNT(*) FROM n"
    scored = sql(["SELECT COUNT(*) FROM head WHERE age > 56"], [endless], [HEAD["context"]])
    assert scored.per_example[0]["error"].startswith("query stopped")


def test_sql_a_prediction_returning_too_many_rows_is_stopped() -> None:
    cross = "SELECT 1 FROM head a, head b, head c, head d"
    scored = sql(["SELECT COUNT(*) FROM head WHERE age > 56"], [cross], [HEAD["context"]])
    assert "more than 10,000 rows" in scored.per_example[0]["error"]


def test_sql_only_the_first_statement_of_a_prediction_counts_and_code_fences_are_removed() -> None:
    prediction = "```sql\nSELECT COUNT(*) FROM head WHERE age > 56;\nDROP TABLE head;\n```\nThis counts the heads."
    scored = sql(["SELECT COUNT(*) FROM head WHERE age > 56"], [prediction], [HEAD["context"]])
    assert scored.metrics == {"executionAccuracy": 1.0}


def test_sql_a_query_in_a_code_fence_after_prose_is_found() -> None:
    prediction = "Here is the query:\n```sql\nSELECT COUNT(*) FROM head WHERE age > 56\n```"
    scored = sql(["SELECT COUNT(*) FROM head WHERE age > 56"], [prediction], [HEAD["context"]])
    assert scored.metrics == {"executionAccuracy": 1.0}


def test_sql_predictions_in_another_dialect_are_transpiled() -> None:
    scored = sql(["SELECT name FROM people WHERE age < 30"], ["SELECT `name` FROM `people` WHERE age < 30"],
                 [PEOPLE["context"]], dialect="mysql")
    assert scored.metrics == {"executionAccuracy": 1.0}


def test_sql_generated_tables_are_the_same_in_every_process() -> None:
    code = ("import json, sys; from kubetune.serving.scorers import score; cases = json.loads(sys.argv[1]); "
            "s = score('sqlExecution', [p for _, _, p in cases], [g for _, g, _ in cases], "
            "[{'context': c} for c, _, _ in cases]); print(json.dumps(s.per_example))")
    outputs = [subprocess.run([sys.executable, "-c", code, json.dumps(SQL_CREATE_CONTEXT)], capture_output=True,
                              text=True, check=True, cwd=REPO, env={**os.environ, "PYTHONHASHSEED": seed}).stdout
               for seed in ("1", "2")]
    assert outputs[0] == outputs[1]
    assert [e["goldRows"] for e in json.loads(outputs[0])] == [
        e["goldRows"] for e in sql([g for _, g, _ in SQL_CREATE_CONTEXT], ["SELECT 1"] * len(SQL_CREATE_CONTEXT),
                                   [c for c, _, _ in SQL_CREATE_CONTEXT]).per_example]


def test_sql_needs_the_context_field_of_each_row() -> None:
    scored = score("sqlExecution", ["SELECT 1"], ["SELECT 1"], [{"question": "q"}])
    assert (scored.kept, scored.per_example[0]["dropped"]) == (0, "no CREATE TABLE context")


# -- exactMatch, chrf, bleu ------------------------------------------------------------------------------


def test_exact_match_ignores_surrounding_and_repeated_whitespace() -> None:
    scored = score("exactMatch", ["  the  answer\n", "the answer"], ["the answer", "an answer"])
    assert scored.metrics == {"exactMatch": 0.5}
    assert [e["score"] for e in scored.per_example] == [1.0, 0.0]


def test_exact_match_is_case_sensitive_unless_told_otherwise() -> None:
    assert one("exactMatch", "The Answer", "the answer").metrics["exactMatch"] == 0.0
    assert one("exactMatch", "The Answer", "the answer", options={"caseSensitive": "false"}).metrics == \
        {"exactMatch": 1.0}


SENTENCES = ["the cat sat on the mat next to the door", "a quick brown fox jumps over the lazy dog"]
DISJOINT = ["xyzzy plugh qwv", "grrk zzq vvvw"]


@pytest.mark.parametrize("name", ["chrf", "bleu"])
def test_sacrebleu_metrics_score_a_perfect_corpus_at_the_maximum(name: str) -> None:
    scored = score(name, SENTENCES, SENTENCES)
    assert scored.primary == name
    assert scored.metrics[name] == pytest.approx(100.0)
    assert [e["score"] for e in scored.per_example] == pytest.approx([1.0, 1.0])


@pytest.mark.parametrize("name", ["chrf", "bleu"])
def test_sacrebleu_metrics_score_disjoint_text_near_zero(name: str) -> None:
    scored = score(name, DISJOINT, SENTENCES)
    assert scored.metrics[name] < 5.0
    assert all(e["score"] < 0.05 for e in scored.per_example)
