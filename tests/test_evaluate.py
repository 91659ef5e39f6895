"""Generation and exact match: batching with left padding changes nothing; scoring is exact."""

import pytest

from lorakit import evaluate
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


@pytest.mark.parametrize("conversations, message", [
    ([{"from": "human", "value": "hi"}], "does not end with a 'gpt' turn"),
    ([], "does not end with a 'gpt' turn"),
    ([{"from": "robot", "value": "hi"}], "is not a FastChat conversation"),
    ([{"from": "human"}], "is not a FastChat conversation"),
])
def test_split_record_rejects_records_without_an_answer(conversations, message):
    with pytest.raises(ValueError, match=message):
        evaluate.split_record({"id": "x", "conversations": conversations})


def test_exact_match_needs_records(base):
    with pytest.raises(ValueError, match="at least one record"):
        evaluate.exact_match(*base, [])
