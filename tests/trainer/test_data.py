"""The trainer's data path: reading, checking, rendering, tokenizing and batching (kubetune.trainer.data)."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.finetunejob import PromptTemplate
from kubetune.trainer.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    Row,
    collate,
    length_grouped_batches,
    padding_waste,
    preflight,
    read_rows,
    render,
    split_validation,
    stream_batches,
    tokenize,
)
from support import shared
from support.workspace import VIGGO_SPECIAL_TOKENS, build_tiny_tokenizer, viggo_template
from viggo_like import viggo_like_rows

VIGGO = viggo_template()


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, rows: list[Any]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def viggo_rows(n: int, source: str = "train.jsonl", seed: int = 0) -> list[Row]:
    return [Row(source, i, fields=r) for i, r in enumerate(viggo_like_rows(n, seed), start=1)]


def ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


# ------------------------------------------------------------------------------------------ reading


def test_jsonl_rows_are_read_with_line_numbers_and_string_values(tmp_path: Path) -> None:
    path = write(tmp_path / "train.jsonl", '{"ref": "Hi", "n": 3, "ok": true}\n\n{"ref": "Yo", "n": 1.5}\n')
    rows = read_rows(path, "jsonl", None)
    assert [(r.source, r.number) for r in rows] == [("train.jsonl", 1), ("train.jsonl", 3)]
    assert rows[0].fields == {"ref": "Hi", "n": "3", "ok": "true"}
    assert rows[1].fields == {"ref": "Yo", "n": "1.5"}


def test_jsonl_columns_map_template_fields_to_keys(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "train.jsonl", [{"sentence": "Hi", "meaning": "greet()", "mr": "ignored"}])
    (row,) = read_rows(path, "jsonl", {"ref": "sentence", "mr": "meaning"})
    assert (row.fields["ref"], row.fields["mr"]) == ("Hi", "greet()")


def test_csv_columns_map_fields_and_unmapped_columns_keep_their_name(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", 'meaning,ref\n"inform(name[Portal 2])",Portal 2 is great.\n')
    (row,) = read_rows(path, "csv", {"mr": "meaning"})
    assert row.fields == {"mr": "inform(name[Portal 2])", "ref": "Portal 2 is great."}


def test_csv_rows_count_data_rows_and_know_the_line_a_quoted_multiline_row_starts_on(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", 'mr,ref\na(),"two\nlines"\n\nb(),one line\n')
    rows = read_rows(path, "csv", None)
    assert [(r.number, r.line) for r in rows] == [(1, 2), (2, 5)]
    assert rows[0].fields["ref"] == "two\nlines"
    assert rows[1].where == "train.csv row 2 (line 5)"


def test_chat_rows_keep_their_messages(tmp_path: Path) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}]
    (row,) = read_rows(jsonl(tmp_path / "chat.jsonl", [{"messages": messages}]), "chat", None)
    assert row.messages == messages


# ------------------------------------------------------------------------- malformed input: DataError


def test_a_line_that_is_not_json_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "train.jsonl", '{"ref": "a", "mr": "b"}\n{"ref": "a", "mr": \n')
    with pytest.raises(DataError, match=r"^train\.jsonl row 2: not valid JSON"):
        read_rows(path, "jsonl", None)


def test_a_json_line_that_is_not_an_object_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "train.jsonl", '{"ref": "a", "mr": "b"}\n\n["a", "b"]\n')
    with pytest.raises(DataError, match=r"^train\.jsonl row 3: expected a JSON object, got an array"):
        read_rows(path, "jsonl", None)


def test_a_missing_template_field_names_row_field_and_placeholders(tmp_path: Path, viggo_tokenizer: Any) -> None:
    rows = read_rows(jsonl(tmp_path / "train.jsonl", [{"ref": "a", "mr": "b"}, {"ref": "c", "m": "d"}]),
                     "jsonl", None)
    with pytest.raises(DataError) as caught:
        preflight(rows, rows[:1], VIGGO, viggo_tokenizer, 64, "all")
    assert str(caught.value) == "train.jsonl row 2: missing field 'mr' (template placeholders: ref, mr)"


def test_a_csv_column_mapped_but_absent_from_the_header_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", "mr,sentence\na(),b\n")
    with pytest.raises(DataError, match=r"^train\.csv line 1: mapped column\(s\) 'text' \(field 'ref'\)"):
        read_rows(path, "csv", {"ref": "text"})


def test_a_header_that_is_not_the_templates_is_described_not_echoed(tmp_path: Path) -> None:
    # A one-line file may be a token: its header's names are never shown, only the manifest's and positions.
    path = write(tmp_path / "train.csv", "hf_AbCdEf0123456789,Text\n")
    with pytest.raises(DataError) as caught:
        read_rows(path, "csv", {"ref": "text", "mr": "mr"})
    assert str(caught.value) == ("train.csv line 1: mapped column(s) 'text' (field 'ref'), 'mr' (field 'mr') not "
                                 "in the header (it has 2 columns; column 2 differs from 'text' only in case)")


def test_a_csv_row_with_too_many_values_names_row_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", "mr,ref\na(),b\nc(),d,e\n")
    with pytest.raises(DataError, match=r"^train\.csv row 2 \(line 3\): 3 values, but the header has 2"):
        read_rows(path, "csv", None)


def test_a_chat_row_not_ending_with_the_assistant_is_rejected(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
        {"messages": [{"role": "user", "content": "Hi"}]},
    ])
    with pytest.raises(DataError, match=r"^chat\.jsonl row 2: the last message must be the assistant's"):
        read_rows(path, "chat", None)


def test_a_chat_message_with_an_unknown_role_is_rejected(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "bot", "content": "Hi"},
                                                         {"role": "assistant", "content": "Hello."}]}])
    with pytest.raises(DataError, match=r"^chat\.jsonl row 1: message 1: role is not one of system, user, "
                                        r"assistant \(it is a string of 3 characters\)$"):
        read_rows(path, "chat", None)  # the role is the file's text: not shown


def test_an_empty_validation_file_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"^valid\.jsonl: no rows"):
        read_rows(write(tmp_path / "valid.jsonl", "\n\n"), "jsonl", None)


def test_preflight_refuses_to_train_without_validation_rows(viggo_tokenizer: Any) -> None:
    with pytest.raises(DataError, match=r"^train\.jsonl: no validation rows"):
        preflight(viggo_rows(4), [], VIGGO, viggo_tokenizer, 128, "all")


def test_a_validation_split_too_small_to_hold_a_row_is_rejected() -> None:
    with pytest.raises(DataError, match=r"^train\.jsonl: validationSplit 0\.02 of 20 rows leaves no validation"):
        split_validation(viggo_rows(20), 0.02, seed=1)


def test_a_stop_token_that_is_several_tokens_is_rejected_pointing_at_special_tokens(tiny_tokenizer: Any) -> None:
    # The template's tokens were never added: '<END_A>' is split into pieces.
    with pytest.raises(DataError, match=r"^train\.jsonl row 1: stop token '<END_A>' is \d+ tokens .*specialTokens"):
        preflight(viggo_rows(4), viggo_rows(2, "valid.jsonl"), VIGGO, tiny_tokenizer, 128, "all")


# ------------------------------------------------------------------------------ split and rendering


def test_split_validation_is_deterministic_disjoint_and_keeps_file_order() -> None:
    rows = viggo_rows(50)
    train, val = split_validation(rows, 0.2, seed=7)
    assert len(val) == 10 and len(train) == 40
    assert sorted(r.number for r in train + val) == list(range(1, 51))
    assert [r.number for r in val] == sorted(r.number for r in val)
    assert split_validation(rows, 0.2, seed=7) == (train, val)
    assert split_validation(rows, 0.2, seed=8)[1] != val


def test_render_fills_placeholders_and_keeps_escaped_braces(tiny_tokenizer: Any) -> None:
    template = PromptTemplate(prompt="Q{{{ref}}}:", completion="{mr}!")
    assert render(Row("t.jsonl", 1, fields={"ref": "hi", "mr": "a()"}), template, tiny_tokenizer) == ("Q{hi}:", "a()!")


def test_render_chat_prompts_with_the_chat_template_and_completes_with_the_last_message(
        tiny_tokenizer: Any) -> None:
    row = Row("chat.jsonl", 1, messages=[{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Hi"},
                                         {"role": "assistant", "content": "Hello."}])
    prompt, completion = render(row, PromptTemplate(), tiny_tokenizer)
    assert prompt == "<s><|system|>Be brief.\n<|user|>Hi\n<|assistant|>"
    assert completion == "Hello."


# ------------------------------------------------------------------------------------------ tokenize


def test_tokenize_is_bos_prompt_completion_and_the_stop_token(viggo_tokenizer: Any) -> None:
    tok = viggo_tokenizer
    example = tokenize("<START_Q>Hi<END_Q>", "<START_A>a()", tok, 128, "all", "<END_A>")
    expected = ([tok.bos_token_id] + ids(tok, "<START_Q>Hi<END_Q>") + ids(tok, "<START_A>a()")
                + [tok.convert_tokens_to_ids("<END_A>")])
    assert example.input_ids == expected
    assert example.labels == expected and not example.truncated


def test_tokenize_appends_eos_when_the_template_has_no_stop_token(viggo_tokenizer: Any) -> None:
    example = tokenize("Hi", "there", viggo_tokenizer, 128, "all", None)
    assert example.input_ids[-1] == viggo_tokenizer.eos_token_id


def test_tokenize_with_loss_on_completion_masks_exactly_the_prompt(viggo_tokenizer: Any) -> None:
    tok = viggo_tokenizer
    n_prompt = 1 + len(ids(tok, "<START_Q>Portal 2 is great.<END_Q>"))  # with BOS
    example = tokenize("<START_Q>Portal 2 is great.<END_Q>", "<START_A>inform()", tok, 128, "completion", "<END_A>")
    assert example.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example.labels[n_prompt:] == example.input_ids[n_prompt:]
    assert example.labels[n_prompt] == tok.convert_tokens_to_ids("<START_A>")


def test_tokenize_does_not_double_a_bos_the_chat_template_already_wrote(viggo_tokenizer: Any) -> None:
    example = tokenize("<s><|user|>Hi\n<|assistant|>", "Hello.", viggo_tokenizer, 128, "all", None)
    assert example.input_ids[:2] != [viggo_tokenizer.bos_token_id] * 2
    assert example.input_ids.count(viggo_tokenizer.bos_token_id) == 1


def test_tokenize_truncates_to_max_length_keeping_the_start_and_flags_it(viggo_tokenizer: Any) -> None:
    full = tokenize("<START_Q>Portal 2 is great.<END_Q>", "<START_A>inform()", viggo_tokenizer, 128, "all",
                    "<END_A>")
    cut = tokenize("<START_Q>Portal 2 is great.<END_Q>", "<START_A>inform()", viggo_tokenizer, 6, "completion",
                   "<END_A>")
    assert cut.truncated and not full.truncated
    assert cut.input_ids == full.input_ids[:6] and len(cut.labels) == 6


# ----------------------------------------------------------------------------------------- preflight


def test_preflight_tokenizes_every_row_and_counts_rows_tokens_and_lengths(viggo_tokenizer: Any) -> None:
    train, val = viggo_rows(40), viggo_rows(10, "valid.jsonl", seed=1)
    result = preflight(train, val, VIGGO, viggo_tokenizer, 512, "completion")
    assert (len(result.train), len(result.val)) == (40, 10)
    stats = result.stats
    lengths = [len(e.input_ids) for e in result.train]
    assert stats["train"]["rows"] == 40 and stats["validation"]["rows"] == 10
    assert stats["train"]["tokens"] == sum(lengths) and stats["train"]["max_tokens"] == max(lengths)
    assert stats["train"]["mean_tokens"] == pytest.approx(sum(lengths) / 40, abs=0.01)
    assert 0 < stats["train"]["loss_tokens"] < stats["train"]["tokens"]
    assert stats["truncated_share"] == 0 and result.warnings == []
    json.dumps(stats)  # goes into result.json as-is


def test_preflight_warns_when_more_than_5_percent_of_rows_are_truncated(viggo_tokenizer: Any) -> None:
    train, val = viggo_rows(40), viggo_rows(10, "valid.jsonl", seed=1)
    lengths = sorted(len(e.input_ids) for e in preflight(train, val, VIGGO, viggo_tokenizer, 512, "all").train)
    result = preflight(train, val, VIGGO, viggo_tokenizer, lengths[len(lengths) // 2], "all")  # ~half cut
    assert 0.05 < result.stats["truncated_share"] < 1
    (warning,) = result.warnings
    assert "(the first: train.jsonl row" in warning and "are truncated; a truncated row loses its stop token" \
        in warning and "maxLength" in warning


def test_preflight_fails_when_every_row_is_truncated(viggo_tokenizer: Any) -> None:
    with pytest.raises(DataError, match=r"^train\.jsonl: every row is longer than maxLength 16"):
        preflight(viggo_rows(10), viggo_rows(3, "valid.jsonl"), VIGGO, viggo_tokenizer, 16, "all")


# -------------------------------------------------------------------------- truncation (real ViGGO rows)


@pytest.fixture(scope="module")
def real_viggo() -> tuple[list[Row], list[Row]]:
    """The first 40 training and 10 validation rows of real ViGGO (long informs and short requests mixed)."""
    folder = shared.DATASETS / "viggo"
    shared.require(folder / "train.csv", "the truncation policy is not checked on real ViGGO rows")
    return read_rows(folder / "train.csv", "csv")[:40], read_rows(folder / "valid.csv", "csv")[:10]


def whole(rows: list[Row], tokenizer: Any) -> list[Any]:
    """Each row tokenized with room to spare (nothing cut)."""
    return [tokenize(*render(r, VIGGO, tokenizer), tokenizer, 100_000, "completion", VIGGO.stop) for r in rows]


def a_max_length_that_cuts_some(rows: list[Row], tokenizer: Any) -> int:
    lengths = sorted(len(e.input_ids) for e in whole(rows, tokenizer))
    return lengths[3 * len(lengths) // 4]  # about a quarter of the rows are longer


def test_drop_truncated_trains_on_exactly_the_rows_that_fit_each_ending_with_its_stop_token(
        viggo_tokenizer: Any, real_viggo: tuple[list[Row], list[Row]]) -> None:
    train, val = real_viggo
    max_length = a_max_length_that_cuts_some(train, viggo_tokenizer)
    fitting = [e.input_ids for e in whole(train, viggo_tokenizer) if len(e.input_ids) <= max_length]
    result = preflight(train, val, VIGGO, viggo_tokenizer, max_length, "completion", "dropTruncated")
    assert [e.input_ids for e in result.train] == fitting
    stop = viggo_tokenizer.convert_tokens_to_ids(VIGGO.stop)
    assert all(e.input_ids[-1] == stop and not e.truncated for e in result.train + result.val)
    st = result.stats["train"]
    assert (st["rows_read"], st["rows"], st["dropped"], st["truncated"]) == (40, len(fitting), 40 - len(fitting), 0)
    assert result.stats["truncation"] == "dropTruncated"


def test_drop_truncated_applies_to_the_validation_rows_too(viggo_tokenizer: Any,
                                                           real_viggo: tuple[list[Row], list[Row]]) -> None:
    train, val = real_viggo
    max_length = a_max_length_that_cuts_some(val, viggo_tokenizer)
    longer = sum(len(e.input_ids) > max_length for e in whole(val, viggo_tokenizer))
    result = preflight(train, val, VIGGO, viggo_tokenizer, max_length, "completion", "dropTruncated")
    assert longer > 0 and (len(result.val), result.stats["validation"]["dropped"]) == (10 - longer, longer)


def test_truncate_keeps_every_row_and_counts_the_ones_cut(viggo_tokenizer: Any,
                                                          real_viggo: tuple[list[Row], list[Row]]) -> None:
    train, val = real_viggo
    max_length = a_max_length_that_cuts_some(train, viggo_tokenizer)
    longer = sum(len(e.input_ids) > max_length for e in whole(train, viggo_tokenizer))
    result = preflight(train, val, VIGGO, viggo_tokenizer, max_length, "all", "truncate")
    st = result.stats["train"]
    assert longer > 0 and (st["rows"], st["truncated"], st["dropped"]) == (40, longer, 0)
    assert sum(e.truncated for e in result.train) == longer


def test_fail_counts_every_long_row_and_names_the_first(viggo_tokenizer: Any,
                                                       real_viggo: tuple[list[Row], list[Row]]) -> None:
    train, val = real_viggo
    max_length = a_max_length_that_cuts_some(train, viggo_tokenizer)
    examples = whole(train, viggo_tokenizer) + whole(val, viggo_tokenizer)
    longer = sum(len(e.input_ids) > max_length for e in examples)
    first = next(r for r, e in zip(train + val, examples, strict=True) if len(e.input_ids) > max_length)
    with pytest.raises(DataError, match=rf"{longer} of 50 rows are longer than maxLength {max_length} tokens "
                       rf"\(the first: {re.escape(first.where)}\) and dataset.truncation is fail"):
        preflight(train, val, VIGGO, viggo_tokenizer, max_length, "completion", "fail")


def test_fail_passes_data_that_fits(viggo_tokenizer: Any, real_viggo: tuple[list[Row], list[Row]]) -> None:
    train, val = real_viggo
    result = preflight(train, val, VIGGO, viggo_tokenizer, 100_000, "completion", "fail")
    assert (len(result.train), len(result.val)) == (40, 10)


def test_dropping_every_validation_row_is_an_error_naming_the_split(
        viggo_tokenizer: Any, real_viggo: tuple[list[Row], list[Row]]) -> None:
    train, val = real_viggo
    max_length = min(len(e.input_ids) for e in whole(val, viggo_tokenizer)) - 1
    with pytest.raises(DataError, match=r"valid.csv: every validation row is longer than maxLength"):
        preflight(train, val, VIGGO, viggo_tokenizer, max_length, "completion", "dropTruncated")


def test_preflight_counts_reach_status_as_the_api_spells_them(viggo_tokenizer: Any,
                                                             real_viggo: tuple[list[Row], list[Row]]) -> None:
    train, val = real_viggo
    max_length = a_max_length_that_cuts_some(train, viggo_tokenizer)
    result = preflight(train, val, VIGGO, viggo_tokenizer, max_length, "completion", "dropTruncated")
    stats = result.stats
    summary = result.summary().to_wire()
    assert summary["truncation"] == "dropTruncated" and summary["maxLength"] == max_length
    assert summary["train"] == {"rows": 40, "used": stats["train"]["rows"], "tokens": stats["train"]["tokens"],
                                "truncated": 0, "dropped": stats["train"]["dropped"]}


# ------------------------------------------------------------------------------------------ batching


def viggo_like_lengths(n: int, seed: int = 0) -> list[int]:
    """Token counts like ViGGO's (20-80, most short requests and opinions, a tail of long informs)."""
    rng = random.Random(seed)
    return [min(80, max(20, int(rng.triangular(20, 80, 35)))) for _ in range(n)]


def test_length_grouped_batches_contain_every_index_exactly_once() -> None:
    lengths = viggo_like_lengths(1000)
    batches = length_grouped_batches(lengths, 16, seed=1, epoch=1, mega_batch=8)
    assert Counter(i for b in batches for i in b) == Counter(range(1000))
    assert sum(len(b) != 16 for b in batches) == 1  # 1000 = 62 * 16 + 8: one short batch, the rest full


def test_length_grouped_batches_are_deterministic_per_seed_and_epoch() -> None:
    lengths = viggo_like_lengths(500)
    assert length_grouped_batches(lengths, 16, 3, 2) == length_grouped_batches(lengths, 16, 3, 2)


def test_length_grouped_batches_differ_across_epochs_and_seeds() -> None:
    lengths = viggo_like_lengths(500)
    assert length_grouped_batches(lengths, 16, 3, 1) != length_grouped_batches(lengths, 16, 3, 2)
    assert length_grouped_batches(lengths, 16, 3, 1) != length_grouped_batches(lengths, 16, 4, 1)


def test_the_batch_with_the_longest_sequence_comes_first() -> None:
    lengths = viggo_like_lengths(500) + [500]
    assert 500 in length_grouped_batches(lengths, 16, 0, 0)[0]


def test_padding_waste_counts_pad_tokens_over_all_padded_tokens() -> None:
    assert padding_waste([[0, 1], [2]], [3, 1, 5]) == pytest.approx(2 / 11)


def test_length_grouping_keeps_padding_under_3_percent_on_viggo_like_lengths() -> None:
    lengths = viggo_like_lengths(5000)
    grouped = padding_waste(length_grouped_batches(lengths, 16, 0, 1), lengths)
    order = list(range(len(lengths)))
    random.Random(0).shuffle(order)
    shuffled = padding_waste([order[i:i + 16] for i in range(0, len(order), 16)], lengths)
    assert grouped <= 0.03
    assert shuffled > 0.25


def test_length_grouping_keeps_padding_under_3_percent_on_real_viggo() -> None:
    path = shared.require(shared.DATASETS / "viggo" / "train.csv", "length grouping is not measured on real viggo")
    rows = read_rows(path, "csv", None)
    texts = [f"{r.fields['ref']} {r.fields['mr']}" for r in rows]
    tok = build_tiny_tokenizer(texts[:1000], VIGGO_SPECIAL_TOKENS, vocab_size=1000)
    tok.add_special_tokens({"extra_special_tokens": VIGGO_SPECIAL_TOKENS}, replace_extra_special_tokens=False)
    lengths = [len(tokenize(*render(r, VIGGO, tok), tok, 512, "all", VIGGO.stop).input_ids) for r in rows]
    grouped = padding_waste(length_grouped_batches(lengths, 16, 0, 1), lengths)
    streamed = list(stream_batches(examples_of(lengths), 16, seed=0, epoch=1))  # what the workers run
    streamed_padding = padding_waste(indexes(streamed), lengths)
    order = list(range(len(lengths)))
    random.Random(0).shuffle(order)
    shuffled = padding_waste([order[i:i + 16] for i in range(0, len(order), 16)], lengths)
    assert grouped <= 0.03 < shuffled
    assert streamed_padding <= 0.03


def examples_of(lengths: list[int]) -> list[Example]:
    """Examples whose first id is their index (to follow them through batching) and of the given lengths."""
    return [Example([i] + [0] * (n - 1), [i] + [0] * (n - 1)) for i, n in enumerate(lengths)]


def indexes(batches: list[list[Example]]) -> list[list[int]]:
    return [[e.input_ids[0] for e in b] for b in batches]


def test_streamed_batches_hold_every_example_once_in_ceil_n_over_batch_size_batches() -> None:
    batches = list(stream_batches(examples_of(viggo_like_lengths(1000)), 16, seed=1, epoch=1, window=8))
    assert Counter(i for b in indexes(batches) for i in b) == Counter(range(1000))
    assert len(batches) == 63 and sum(len(b) != 16 for b in batches) == 1  # 1000 = 62 * 16 + 8


def test_streamed_batching_holds_at_most_two_windows_of_examples() -> None:
    consumed = 0

    def stream() -> Any:
        nonlocal consumed
        for example in examples_of(viggo_like_lengths(5000)):
            consumed += 1
            yield example

    emitted, held = 0, []
    for batch in stream_batches(stream(), 16, window=8):
        emitted += len(batch)
        held.append(consumed - emitted)
    assert max(held) <= 2 * 8 * 16 and consumed == emitted == 5000


def test_a_worker_with_more_rows_than_its_limit_runs_the_same_number_of_batches() -> None:
    shorter = list(stream_batches(examples_of(viggo_like_lengths(100)), 16, rank=0))
    longer = list(stream_batches(examples_of(viggo_like_lengths(130)), 16, rank=1, limit=100))
    assert len(shorter) == len(longer) == 7


def test_streamed_batches_are_deterministic_per_seed_rank_and_epoch() -> None:
    lengths = viggo_like_lengths(500)

    def run(seed: int, rank: int, epoch: int) -> list[list[int]]:
        return indexes(list(stream_batches(examples_of(lengths), 16, seed=seed, rank=rank, epoch=epoch, window=4)))

    assert run(3, 0, 2) == run(3, 0, 2)
    assert run(3, 0, 1) != run(3, 0, 2) and run(3, 0, 1) != run(4, 0, 1) and run(3, 0, 1) != run(3, 1, 1)


def test_streamed_batching_mixes_examples_across_windows() -> None:
    batches = indexes(list(stream_batches(examples_of(viggo_like_lengths(2000)), 16, window=4)))
    first_window = set(range(4 * 16))
    # A batch of the first window holds examples that arrived after it: the shuffle buffer moved them.
    assert any(i not in first_window for b in batches[:4] for i in b)


def test_the_first_streamed_batch_holds_the_longest_sequence_of_the_first_window() -> None:
    lengths = viggo_like_lengths(2000)
    batches = list(stream_batches(examples_of(lengths), 16, window=4))
    first_window = [e for b in batches[:4] for e in b]
    assert max(len(e.input_ids) for e in batches[0]) == max(len(e.input_ids) for e in first_window)


def test_validation_batches_keep_every_example_without_shuffling_across_windows() -> None:
    batches = indexes(list(stream_batches(examples_of(viggo_like_lengths(300)), 16, window=4, shuffle=False)))
    assert [sorted(i for b in batches[w:w + 4] for i in b) for w in (0, 4)] == [list(range(64)), list(range(64, 128))]


def test_streamed_length_grouping_keeps_padding_under_3_percent_on_viggo_like_lengths() -> None:
    lengths = viggo_like_lengths(5000)
    batches = list(stream_batches(examples_of(lengths), 16, seed=0, epoch=1))
    padded = sum(max(len(e.input_ids) for e in b) * len(b) for b in batches)
    assert (padded - sum(lengths)) / padded <= 0.03


def test_collate_right_pads_ids_mask_and_labels() -> None:
    batch = collate([Example([5, 6, 7], [-100, 6, 7]), Example([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert {str(t.dtype) for t in batch.values()} == {"torch.int64"}


# ------------------------------------------------------------------------------- test support itself


def test_the_tiny_tokenizer_leaves_template_tokens_to_the_trainer(viggo_tokenizer: Any) -> None:
    assert len(ids(build_tiny_tokenizer(["a b"], ["<END_A>"]), "<END_A>")) > 1
    assert len(ids(viggo_tokenizer, "<END_A>")) == 1


def test_viggo_like_rows_are_deterministic_and_their_mr_follows_from_the_sentence() -> None:
    rows = viggo_like_rows(3000, seed=5)
    assert rows == viggo_like_rows(3000, seed=5)
    mrs: dict[str, set[str]] = {}
    for r in rows:
        mrs.setdefault(r["ref"], set()).add(r["mr"])
    assert all(len(m) == 1 for m in mrs.values())
    assert {r["mr"].split("(")[0] for r in rows} == {
        "inform", "request", "give_opinion", "confirm", "suggest", "request_explanation", "verify_attribute",
        "recommend", "request_attribute"}

