"""lorakit.records: every bad record, in either shape, is named by file:line (or record index) and the fix; both shapes
give the same chat messages; loading is fuzzed."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorakit import data, evaluate
from lorakit.models import TASK_DIR
from lorakit.records import (
    EXAMPLE,
    MESSAGES_EXAMPLE,
    ROLES,
    DataError,
    check_record,
    load_records,
    load_records_with_locations,
)


def conv(*turns: tuple[str, object], **keys) -> dict:
    return {**keys, "conversations": [{"from": who, "value": text} for who, text in turns]}


def msgs(*messages: tuple[str, object], **keys) -> dict:
    return {**keys, "messages": [{"role": role, "content": text} for role, text in messages]}


def as_messages(record: dict) -> dict:
    """A ShareGPT record rewritten in the "messages" shape (a record-level "system" becomes the first message)."""
    system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    turns = [{"role": ROLES[t["from"]], "content": t["value"]} for t in record["conversations"]]
    return {**{k: v for k, v in record.items() if k not in ("conversations", "system")}, "messages": system + turns}


GOOD = conv(("human", "reverse: abc"), ("gpt", "cba"))
GOOD_MESSAGES = msgs(("user", "reverse: abc"), ("assistant", "cba"))


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


def json_documents(keys: list[str], atoms) -> st.SearchStrategy[str]:
    """Any text, or JSON built from `atoms` and dicts over `keys`: what a broken or half-right data file looks like."""
    return st.one_of(st.text(max_size=200), st.recursive(atoms, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(keys), inner, max_size=3), max_leaves=12).map(json.dumps))


def loaded_or_refused(tmp_path, text: str, suffix: str) -> list[dict] | None:
    """The records a fuzzed file loads to, or None when it is refused with one line naming the file."""
    path = tmp_path / f"fuzz{suffix}"
    path.write_text(text, encoding="utf-8")
    try:
        return load_records(path)
    except DataError as error:
        assert str(path) in str(error) and "\n" not in str(error)
        return None


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(json_documents(["conversations", "from", "value", "id"], st.none() | st.booleans() | st.integers()
                      | st.text(max_size=8) | st.sampled_from(["human", "gpt", "system"])),
       st.sampled_from([".jsonl", ".json"]))
def test_fuzz_loads_or_raises_data_error(tmp_path, text, suffix):
    records = loaded_or_refused(tmp_path, text, suffix)
    assert records is None or (records and all(check_record(r, "again") for r in records))


def test_locations_name_the_line_despite_blank_lines(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", ["", json.dumps(GOOD), "", "", json.dumps(GOOD)])
    records, locations = load_records_with_locations(path)
    assert records == [GOOD, GOOD] and locations == [f"{path}:2", f"{path}:5"]
    (tmp_path / "train.json").write_text(json.dumps([GOOD, GOOD], indent=2))
    assert load_records_with_locations(tmp_path / "train.json")[1] == [f"{tmp_path / 'train.json'} record {i}"
                                                                       for i in (0, 1)]


def test_one_role_table_for_validation_scoring_and_the_data_module():
    assert evaluate.check_record is check_record and data.check_record is check_record
    assert data.ROLES is ROLES and data.load_records is load_records
    assert check_record(conv(("system", "s"), ("human", "q"), ("gpt", "a")), "x") == [
        {"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


# --- The "messages" shape (TRL, OpenAI fine-tuning files, Hugging Face chat datasets) and system prompts ---

def assistant(text: object, **keys) -> dict:
    return {"role": "assistant", "content": text, **keys}


# (the record on line 3 of a file whose first record is in the "messages" shape, the whole error after "FILE:3: ")
MESSAGES_ERRORS = [
    ('{"messages": []}', f'"messages" must be a non-empty list of messages like {MESSAGES_EXAMPLE}'),
    ('{"messages": {"role": "user"}}', f'"messages" must be a non-empty list of messages like {MESSAGES_EXAMPLE}'),
    ('{"messages": [{"role": "user"}]}', "message 0 must be an object with \"role\" and \"content\", got "
                                         "{'role': 'user'}"),
    ('{"messages": [{"from": "human", "value": "hi"}]}',
     "message 0 must be an object with \"role\" and \"content\", got {'from': 'human', 'value': 'hi'}; it looks "
     'like the ShareGPT shape ("conversations"): rename "messages" to "conversations"'),
    (msgs(("human", "hi"), ("gpt", "yo")), "message 0 has unknown role \"role\": 'human'; use one of ['assistant', "
                                           "'system', 'user'] (\"user\" asks, \"assistant\" answers)"),
    (msgs(("developer", "be terse"), ("user", "hi"), ("assistant", "yo")),
     "message 0 has unknown role \"role\": 'developer'; use one of ['assistant', 'system', 'user'] (\"user\" asks, "
     '"assistant" answers); "developer" is OpenAI\'s newer name for "system": rename it'),
    (msgs(("user", "time?"), ("assistant", "..."), ("tool", "12:00")),
     "message 2 has unknown role \"role\": 'tool'; use one of ['assistant', 'system', 'user'] (\"user\" asks, "
     '"assistant" answers); tool calls are not supported: drop the records that use them'),
    (msgs(("user", "hi"), (None, "yo")), "message 1 has unknown role \"role\": None; use one of ['assistant', "
                                         "'system', 'user'] (\"user\" asks, \"assistant\" answers)"),
    (msgs(("user", "hi"), ("assistant", None)),
     'message 1 (assistant) has a NoneType "content", not text; lorakit trains on plain text (no content parts or '
     "tool calls): give it one string or drop the record"),
    (msgs(("user", [{"type": "text", "text": "hi"}]), ("assistant", "yo")),
     'message 0 (user) has a list "content", not text; lorakit trains on plain text (no content parts or tool '
     "calls): give it one string or drop the record"),
    (msgs(("user", "hi"), ("assistant", " \n")),
     'message 1 (assistant) has an empty "content"; give it text or drop the message (and its reply)'),
    (msgs(("assistant", "yo"), ("user", "hi")),
     "the first message (after an optional system message) must be from \"user\", got 'assistant'; drop the leading "
     "reply or add the question it answers"),
    (msgs(("system", "be terse")), 'the first message (after an optional system message) must be from "user", got '
                                   "nothing; drop the leading reply or add the question it answers"),
    (msgs(("user", "a"), ("user", "b"), ("assistant", "c")),
     "messages must alternate user, assistant, user, ...; message 1 breaks it; merge consecutive messages of one "
     "speaker"),
    (msgs(("user", "a"), ("assistant", "b"), ("system", "now be verbose"), ("user", "c"), ("assistant", "d")),
     "message 2 is a system message, but only the first message may be; move its text into the system prompt at the "
     "start"),
    (msgs(("system", "be terse"), ("user", "hi")), 'no "assistant" reply to learn from; add the answer message or drop '
                                                   "the record"),
    ({"messages": [{"role": "user", "content": "hi"}, assistant("yo", weight=0.5)]},
     'message 1 (assistant) has "weight": 0.5; only assistant messages take one, 0 (keep the reply as context, do not '
     "learn it) or 1 (learn it, the default)"),
    ({"messages": [{"role": "user", "content": "hi", "weight": 0}, assistant("yo")]},
     'message 0 (user) has "weight": 0; only assistant messages take one, 0 (keep the reply as context, do not learn '
     "it) or 1 (learn it, the default)"),
    ({"messages": [{"role": "user", "content": "hi"}, assistant("yo", weight=True)]},
     'message 1 (assistant) has "weight": True; only assistant messages take one, 0 (keep the reply as context, do '
     "not learn it) or 1 (learn it, the default)"),
    (msgs(("user", "hi"), ("assistant", "yo"), system="be terse"),
     'a record-level "system" is the ShareGPT way; in a "messages" record the system prompt is the first message, '
     '{"role": "system", "content": ...}: move it there'),
    ({**GOOD, **GOOD_MESSAGES}, 'the record has both "conversations" and "messages"; keep the one that holds the '
                                "conversation and drop the other"),
    (GOOD, 'this record is in the ShareGPT shape ("conversations") but the file\'s first record ({path}:1) is in the '
           f'"messages" shape, and a file holds one shape; write it as {MESSAGES_EXAMPLE} or keep the two shapes in '
           "separate files"),
    ('"just text"', f"a record must be a JSON object like {EXAMPLE} or {MESSAGES_EXAMPLE}, got str"),
    ('{"text": "hi"}', f'missing key "conversations" or "messages" (keys: [\'text\']); each record needs {EXAMPLE} or '
                       f"{MESSAGES_EXAMPLE}"),
]


@pytest.mark.parametrize("record, message", MESSAGES_ERRORS, ids=[f"msg-{i}" for i in range(len(MESSAGES_ERRORS))])
def test_messages_errors_name_file_line_and_fix(tmp_path, record, message):
    line = record if isinstance(record, str) else json.dumps(record)
    path = write_lines(tmp_path / "train.jsonl", [json.dumps(GOOD_MESSAGES), "", line])
    with pytest.raises(DataError) as error:
        load_records(path)
    assert str(error.value) == f"{path}:3: " + message.replace("{path}", str(path))


# (a ShareGPT record on line 3 after a good one: system prompts, non-text values, and the other shape mixed in)
SHAREGPT_ERRORS = [
    (conv(("system", "a"), ("human", "q"), ("gpt", "r"), system="b"),
     'two system prompts, the record\'s "system" and turn 0; keep one'),
    (conv(("human", "q"), ("gpt", "r"), system=["be", "terse"]),
     '"system" must be a string (the system prompt), got list; give it text or drop the key'),
    (conv(("human", "q"), ("gpt", "r"), ("system", "s"), ("human", "q2"), ("gpt", "r2")),
     "turn 2 is a system turn, but only the first turn may be; move its text into the system prompt at the start"),
    (conv(("human", "q"), ("gpt", 7)), 'turn 1 (gpt) has a int "value", not text; lorakit trains on plain text (no '
                                       "content parts or tool calls): give it one string or drop the record"),
    (conv(("gpt", "r"), ("human", "q"), system="s"), "the first turn (after an optional system turn) must be from "
                                                     "\"human\", got 'gpt'; drop the leading reply or add the question "
                                                     "it answers"),
    (conv(("human", "a"), ("gpt", "b"), ("gpt", "c"), system="s"),
     "turns must alternate human, gpt, human, ...; turn 2 breaks it; merge consecutive turns of one speaker"),
    ({"conversations": [{"role": "user", "content": "q"}]},
     "turn 0 must be an object with \"from\" and \"value\", got {'role': 'user', 'content': 'q'}; it looks like the "
     '"messages" shape: rename "conversations" to "messages"'),
    (GOOD_MESSAGES, 'this record is in the "messages" shape but the file\'s first record ({path}:1) is in the '
                    f'ShareGPT shape ("conversations"), and a file holds one shape; write it as {EXAMPLE} or keep the '
                    "two shapes in separate files"),
]


@pytest.mark.parametrize("record, message", SHAREGPT_ERRORS, ids=[f"sgpt-{i}" for i in range(len(SHAREGPT_ERRORS))])
def test_sharegpt_system_and_mixing_errors(tmp_path, record, message):
    path = write_lines(tmp_path / "train.jsonl", [json.dumps(GOOD), "", json.dumps(record)])
    with pytest.raises(DataError) as error:
        load_records(path)
    assert str(error.value) == f"{path}:3: " + message.replace("{path}", str(path))


def test_mixed_json_list_names_both_records(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([GOOD_MESSAGES, GOOD_MESSAGES, GOOD]))
    with pytest.raises(DataError, match=rf"^{path} record 2: this record is in the ShareGPT shape \("
                                        rf"\"conversations\"\) but the file's first record \({path} record 0\)"):
        load_records(path)


def test_messages_eval_record_needs_its_answer_last(tmp_path):
    path = write_lines(tmp_path / "eval.jsonl", [json.dumps(GOOD_MESSAGES),
                                                json.dumps(msgs(("user", "q"), ("assistant", "a"), ("user", "and?")))])
    assert len(load_records(path)) == 2  # as training data a trailing question is harmless: it gets no labels
    with pytest.raises(DataError) as error:
        load_records(path, for_eval=True)
    assert str(error.value) == (f'{path}:2: an evaluation record must end with its "assistant" answer (exact match '
                                'scores the reply to everything before it), but its last message is from "user"; add '
                                "the answer or drop the trailing message")


SYSTEM, USER, REPLY = {"role": "system", "content": "be terse"}, {"role": "user", "content": "q"}, assistant("a")


@pytest.mark.parametrize("record, expected", [
    (GOOD_MESSAGES, check_record(GOOD, "x")),
    (conv(("system", "be terse"), ("human", "q"), ("gpt", "a")), [SYSTEM, USER, REPLY]),
    (conv(("human", "q"), ("gpt", "a"), system="be terse"), [SYSTEM, USER, REPLY]),  # LLaMA-Factory's ShareGPT
    (msgs(("system", "be terse"), ("user", "q"), ("assistant", "a")), [SYSTEM, USER, REPLY]),
    (conv(("human", "q"), ("gpt", "a"), system=""), [USER, REPLY]),  # an empty column is no system prompt
    (msgs(("user", "q"), ("assistant", "a"), system=" "), [USER, REPLY]),
    (conv(("user", "q"), ("assistant", "a")), [USER, REPLY]),  # ShareGPT files that use the chat role names
    ({"messages": [USER, assistant("a", weight=1)]}, [USER, REPLY]),  # 1 is the default
    ({"messages": [{**USER, "weight": None}, assistant("a", weight=None, name=None)], "system": None},
     [USER, REPLY]),  # a table export (Parquet -> JSON) writes null for the fields a row lacks
    ({"messages": [USER, assistant("a", weight=0), USER, REPLY], "id": 3, "name": "n"},
     [USER, {**REPLY, "weight": 0}, USER, REPLY]),  # OpenAI's weight 0: kept as context, not learned (lorakit.data)
])
def test_both_shapes_give_the_same_messages(record, expected):
    assert check_record(record, "x") == expected
    if "conversations" in record:
        assert check_record(as_messages(record), "x") == expected


def test_task_files_load_the_same_in_both_shapes(tmp_path):
    records = load_records(TASK_DIR / "eval.jsonl")
    path = write_lines(tmp_path / "eval.jsonl", [json.dumps(as_messages(r)) for r in records])
    again = load_records(path, for_eval=True)
    assert [check_record(r, "x") for r in again] == [check_record(r, "x") for r in records]
    assert again[0] == {"id": records[0]["id"], "messages": again[0]["messages"]}  # returned as written


@FUZZ
@given(json_documents(["messages", "role", "content", "weight", "system", "conversations", "id"],
                      st.none() | st.booleans() | st.integers(-1, 2) | st.text(max_size=8)
                      | st.sampled_from(["user", "assistant", "system", "human", "tool"])),
       st.sampled_from([".jsonl", ".json"]))
def test_fuzz_messages_loads_or_raises_data_error(tmp_path, text, suffix):
    records = loaded_or_refused(tmp_path, text, suffix)
    if records is None:
        return
    messages = [check_record(r, "again") for r in records]
    assert all(m[-1]["role"] in ("assistant", "user") and any(t["role"] == "assistant" for t in m) for m in messages)
