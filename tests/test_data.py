"""lorakit.data: every bad record is named by file:line, labels cover exactly the replies, loading is fuzzed."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorakit.data import (
    IGNORE_INDEX,
    DataCollator,
    DataError,
    LazySupervisedDataset,
    SupervisedDataset,
    check_record,
    ensure_pad_token,
    load_records,
    make_supervised_data_module,
    tokenize_conversation,
)
from lorakit.models import TASK_DIR, encode_pair, load_base


@pytest.fixture(scope="module")
def tokenizer():
    return load_base("tiny")[1]


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


def test_labels_only_on_replies_and_match_pretraining_encoding(tokenizer):
    messages = check_record(GOOD, "x")
    ids, labels, truncated = tokenize_conversation(tokenizer, messages, max_length=512)
    assert (ids, labels) == encode_pair(tokenizer, "reverse: abc", "cba") and not truncated
    learned = tokenizer.decode([i for i in labels if i != IGNORE_INDEX])
    assert learned == "cba" + tokenizer.eos_token


def test_multi_turn_labels_cover_every_reply(tokenizer):
    record = conv(("system", "short answers"), ("human", "q1"), ("gpt", "a1"), ("human", "q2"), ("gpt", "a2"))
    ids, labels, _ = tokenize_conversation(tokenizer, check_record(record, "x"), max_length=512)
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(check_record(record, "x"), tokenize=False)
    eos = tokenizer.eos_token
    assert tokenizer.decode([i for i in labels if i != IGNORE_INDEX]) == f"a1{eos}a2{eos}"


def test_truncation_is_counted(tokenizer):
    records = [GOOD, conv(("human", "reverse: " + "x" * 40), ("gpt", "y" * 40))]
    dataset = SupervisedDataset(records, tokenizer, max_length=24)
    assert dataset.truncated == 1 and len(dataset[1]["input_ids"]) == 24 and len(dataset[0]["input_ids"]) < 24


def test_lazy_equals_eager(tokenizer):
    records = load_records(TASK_DIR / "eval.jsonl")[:10]
    eager, lazy = SupervisedDataset(records, tokenizer, 64), LazySupervisedDataset(records, tokenizer, 64)
    assert len(lazy.cache) == 0
    for i in range(len(records)):
        assert all(torch.equal(eager[i][k], lazy[i][k]) for k in ("input_ids", "labels", "attention_mask"))
    assert len(lazy.cache) == 10


def test_collator_pads_right():
    examples = [{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7]),
                 "attention_mask": torch.ones(3, dtype=torch.long)},
                {"input_ids": torch.tensor([8]), "labels": torch.tensor([8]), "attention_mask": torch.ones(1)}]
    batch = DataCollator(pad_token_id=0)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert DataCollator(pad_token_id=0, pad_to_multiple_of=8)(examples)["input_ids"].shape == (2, 8)


def test_pad_token_without_unk(tokenizer):
    ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == "<pad>"  # an existing pad token is kept
    fake = SimpleNamespace(pad_token=None, eos_token="</s>", unk_token=None)
    assert ensure_pad_token(fake) == "</s>"
    with pytest.raises(ValueError, match="neither a pad nor an eos token"):
        ensure_pad_token(SimpleNamespace(pad_token=None, eos_token=None))


def test_make_supervised_data_module(tokenizer):
    args = SimpleNamespace(data_path=TASK_DIR / "train.jsonl", eval_data_path="", lazy_preprocess=False)
    module = make_supervised_data_module(tokenizer, args)
    assert len(module["train_dataset"]) == 600 and module["eval_dataset"] is None
    batch = module["data_collator"]([module["train_dataset"][i] for i in range(4)])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
