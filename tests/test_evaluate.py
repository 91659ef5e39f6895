"""Generation and exact match: batching with left padding changes nothing; scoring is exact."""

import json
import re

import pytest

from lorakit import evaluate
from lorakit.data import load_records_with_locations
from lorakit.models import load_base
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


# (the turns of record "x", what the ValueError says after the record's name)
SPLIT_ERRORS = [
    ([{"from": "human", "value": "hi"}], " does not end with a 'gpt' turn to score against (last turn from 'human'); "
                                         "end each evaluation record with its \"gpt\" answer, or drop the trailing turn"),
    ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}, {"from": "human", "value": "and?"}],
     " does not end with a 'gpt' turn to score against (last turn from 'human')"),
    ([], " does not end with a 'gpt' turn to score against (no turns)"),
    ([{"from": "gpt", "value": "a"}], ' has no "human" question before its \'gpt\' answer'),
    ([{"from": "system", "value": "s"}, {"from": "gpt", "value": "a"}], ' has no "human" question'),
    ([{"from": "robot", "value": "hi"}], " is not a FastChat conversation (KeyError: 'robot')"),
    ([{"from": "human"}], " is not a FastChat conversation (KeyError: 'value')"),
    ("hi", " is not a FastChat conversation (TypeError: "),
]


@pytest.mark.parametrize("where, name", [("data/eval.jsonl:7", "data/eval.jsonl:7"), ("", "record 'x'")])
@pytest.mark.parametrize("conversations, message", SPLIT_ERRORS)
def test_split_record_names_the_record_and_the_fix(conversations, message, where, name):
    with pytest.raises(ValueError) as error:
        evaluate.split_record({"id": "x", "conversations": conversations}, where)
    assert str(error.value).startswith(name + message), str(error.value)


def test_exact_match_names_the_line_of_a_record_without_answer(tmp_path):
    trailing = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "b"},
                                  {"from": "human", "value": "and?"}]}
    path = tmp_path / "eval.jsonl"
    path.write_text(f"{json.dumps(record('a', 'q', 'a'))}\n\n{json.dumps(trailing)}\n")  # line 2 is blank
    records, locations = load_records_with_locations(path)  # without for_eval, which would refuse it already
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}:3 does not end with a 'gpt' turn"):
        evaluate.exact_match(None, None, records, locations=locations)  # refused before any generation
    with pytest.raises(ValueError, match="1 locations for 2 records"):
        evaluate.exact_match(None, None, records, locations=locations[:1])


def test_exact_match_needs_records(base):
    with pytest.raises(ValueError, match="at least one record"):
        evaluate.exact_match(*base, [])
