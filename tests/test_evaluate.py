"""Generation and exact match: batching with left padding changes nothing; scoring is exact, in either record shape."""

import json
import re

import pytest
from test_records import as_messages

from lorakit import evaluate
from lorakit.data import check_record, load_records, load_records_with_locations
from lorakit.models import TASK_DIR, load_base
from lorakit.tasks import record


@pytest.fixture(scope="module")
def base():
    return load_base("tiny")


def test_batched_generation_equals_one_by_one(base):
    model, tokenizer = base
    conversations = [[{"role": "user", "content": q}] for q in ["copy: ab", "upper: kfdqz", "last: xyzw", "add: 3+4"]]
    batched = evaluate.generate(model, tokenizer, conversations)
    single = [evaluate.generate(model, tokenizer, [c])[0] for c in conversations]
    assert batched == single
    assert tokenizer.padding_side == "right"  # restored


def test_exact_match_counts_exact_replies_only(base):
    model, tokenizer = base
    records = [record("a", "upper: abc", "ABC"), record("b", "upper: abc", "ABD")]
    reply = evaluate.generate(model, tokenizer, [[{"role": "user", "content": "upper: abc"}]])[0]
    expected = (reply == "ABC") / 2 + (reply == "ABD") / 2
    assert evaluate.exact_match(model, tokenizer, records) == expected


# (the turns of record "x", what the DataError (a ValueError) says after the record's name): lorakit.records'
# check_record validates evaluation records for training and scoring alike
LAST = ': an evaluation record must end with its "gpt" answer (exact match scores the reply to everything before it), '
SPLIT_ERRORS = [
    ([{"from": "human", "value": "hi"}], ': no "gpt" reply to learn from; add the answer turn or drop the record'),
    ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}, {"from": "human", "value": "and?"}],
     LAST + 'but its last turn is from "human"; add the answer or drop the trailing turn'),
    ([], ': "conversations" must be a non-empty list of turns like '),
    ([{"from": "gpt", "value": "a"}], ': the first turn (after an optional system turn) must be from "human", got '
                                      "'gpt'; drop the leading reply or add the question it answers"),
    ([{"from": "system", "value": "s"}, {"from": "gpt", "value": "a"}], ": the first turn (after an optional system "
                                                                        "turn) must be from \"human\", got 'gpt'"),
    ([{"from": "robot", "value": "hi"}], ": turn 0 has unknown role \"from\": 'robot'; use one of "),
    ([{"from": "human"}], ': turn 0 must be an object with "from" and "value", got '),
    ("hi", ': "conversations" must be a non-empty list of turns like '),
]


@pytest.mark.parametrize("where, name", [("data/eval.jsonl:7", "data/eval.jsonl:7"), ("", "record 'x'")])
@pytest.mark.parametrize("conversations, message", SPLIT_ERRORS)
def test_split_record_names_the_record_and_the_fix(conversations, message, where, name):
    with pytest.raises(ValueError) as error:
        evaluate.split_record({"id": "x", "conversations": conversations}, where)
    assert str(error.value).startswith(name + message), str(error.value)


def test_split_record_is_the_same_for_both_shapes():
    sharegpt = {"id": "a", "system": "be terse", "conversations": [
        {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2"},
        {"from": "gpt", "value": "a2"}]}
    messages = as_messages(sharegpt)
    assert messages["messages"][0] == {"role": "system", "content": "be terse"}
    assert evaluate.split_record(messages) == evaluate.split_record(sharegpt) == (
        check_record(sharegpt, "x")[:-1], "a2")
    with pytest.raises(ValueError, match="^record 'b': an evaluation record must end with its \"assistant\" answer"):
        evaluate.split_record({"id": "b", "messages": messages["messages"][:-1]})


def test_exact_match_is_the_same_on_a_messages_eval_file(base, tmp_path):
    model, tokenizer = base
    records = load_records(TASK_DIR / "eval.jsonl")[:8]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(as_messages(r)) + "\n" for r in records))
    in_messages = load_records(tmp_path / "eval.jsonl", for_eval=True)
    assert evaluate.predictions(model, tokenizer, in_messages) == evaluate.predictions(model, tokenizer, records)


def test_exact_match_names_the_line_of_a_record_without_answer(tmp_path):
    trailing = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "b"},
                                  {"from": "human", "value": "and?"}]}
    path = tmp_path / "eval.jsonl"
    path.write_text(f"{json.dumps(record('a', 'q', 'a'))}\n\n{json.dumps(trailing)}\n")  # line 2 is blank
    records, locations = load_records_with_locations(path)  # without for_eval, which would refuse it already
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}:3: an evaluation record must end with its "):
        evaluate.exact_match(None, None, records, locations=locations)  # refused before any generation
    with pytest.raises(ValueError, match="1 locations for 2 records"):
        evaluate.exact_match(None, None, records, locations=locations[:1])


def test_exact_match_needs_records(base):
    with pytest.raises(ValueError, match="at least one record"):
        evaluate.exact_match(*base, [])
