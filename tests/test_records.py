"""lorakit.records: every bad record is named by file:line (or record index) and the fix; loading is fuzzed."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorakit import data, evaluate
from lorakit.models import TASK_DIR
from lorakit.records import ROLES, DataError, check_record, load_records, load_records_with_locations


def conv(*turns: tuple[str, str]) -> dict:
    return {"conversations": [{"from": who, "value": text} for who, text in turns]}


GOOD = conv(("human", "reverse: abc"), ("gpt", "cba"))


def write_lines(path, lines: list[str]):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("line, message", [
    ("{not json", "not JSON"),
    ("[1, 2]", "a record must be a JSON object"),
    ('{"id": 3}', 'missing key "conversations"'),
    ('{"conversations": []}', "must be a non-empty list"),
    ('{"conversations": [{"from": "human"}]}', 'turn 0 must be an object with "from" and "value"'),
    (json.dumps(conv(("human", "hi"), ("bot", "yo"))), "turn 1 has unknown role \"from\": 'bot'"),
    (json.dumps(conv(("human", "hi"), ("gpt", "  "))), 'turn 1 (gpt) has an empty "value"'),
    (json.dumps(conv(("gpt", "hi"), ("human", "yo"))), "the first turn (after an optional system turn) must be from"),
    (json.dumps(conv(("human", "a"), ("human", "b"))), "turns must alternate human, gpt"),
    (json.dumps(conv(("system", "be terse"), ("human", "hi"))), 'no "gpt" reply to learn from'),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "train.jsonl", [json.dumps(GOOD), "", line])  # the bad record is on line 3
    with pytest.raises(DataError) as error:
        load_records(path)
    assert f"{path}:3" in str(error.value) and message in str(error.value)


@pytest.mark.parametrize("text, message", [
    ("", "no records; the file is empty"),
    ("\n\n", "no records; the file is empty"),
])
def test_empty_files(tmp_path, text, message):
    for suffix in (".jsonl", ".json"):
        path = tmp_path / f"d{suffix}"
        path.write_text(text)
        with pytest.raises(DataError, match=message):
            load_records(path)


def test_json_errors_name_record_index(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([GOOD, GOOD, {"conversation": []}]))
    with pytest.raises(DataError, match=r"train.json record 2: missing key \"conversations\""):
        load_records(path)
    path.write_text('[\n{"conversations": [\n}')
    with pytest.raises(DataError, match=r"train.json:3: not JSON"):
        load_records(path)
    path.write_text(json.dumps(GOOD))
    with pytest.raises(DataError, match="must hold a list of records, got dict"):
        load_records(path)


def test_bad_path_and_format(tmp_path):
    with pytest.raises(DataError, match="unknown data format '.csv'"):
        load_records(tmp_path / "x.csv")
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "missing.jsonl")
    (tmp_path / "latin.jsonl").write_bytes(b"\xff\xfe")
    with pytest.raises(DataError, match="not UTF-8"):
        load_records(tmp_path / "latin.jsonl")


def test_json_and_jsonl_load_the_same(tmp_path):
    records = load_records(TASK_DIR / "eval.jsonl")
    (tmp_path / "eval.json").write_text(json.dumps(records, indent=1))
    assert load_records(tmp_path / "eval.json") == records and len(records) == 100


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.text(max_size=200), st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.sampled_from(["human", "gpt", "system"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["conversations", "from", "value", "id"]), inner, max_size=3), max_leaves=12).map(json.dumps)),
    st.sampled_from([".jsonl", ".json"]))
def test_fuzz_loads_or_raises_data_error(tmp_path, text, suffix):
    path = tmp_path / f"fuzz{suffix}"
    path.write_text(text, encoding="utf-8")
    try:
        records = load_records(path)
    except DataError as error:
        assert str(path) in str(error)
        return
    assert records and all(check_record(r, "again") for r in records)


def test_locations_name_the_line_despite_blank_lines(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", ["", json.dumps(GOOD), "", "", json.dumps(GOOD)])
    records, locations = load_records_with_locations(path)
    assert records == [GOOD, GOOD] and locations == [f"{path}:2", f"{path}:5"]
    (tmp_path / "train.json").write_text(json.dumps([GOOD, GOOD], indent=2))
    assert load_records_with_locations(tmp_path / "train.json")[1] == [f"{tmp_path / 'train.json'} record {i}"
                                                                       for i in (0, 1)]


def test_one_role_table_for_validation_scoring_and_the_data_module():
    assert evaluate.ROLES is ROLES and data.ROLES is ROLES and data.load_records is load_records
    assert check_record(conv(("system", "s"), ("human", "q"), ("gpt", "a")), "x") == [
        {"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
