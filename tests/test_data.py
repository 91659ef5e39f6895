"""lorakit.data: labels cover exactly the replies (never a system prompt), the collator pads right, every check names
the record's line, and both record shapes give the same tokens.

Reading and validating the records is tests/test_records.py.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_records import GOOD, GOOD_MESSAGES, as_messages, conv, msgs, write_lines
from transformers import AutoTokenizer

from lorakit.data import (
    IGNORE_INDEX,
    DataCollator,
    DataError,
    LazySupervisedDataset,
    SupervisedDataset,
    check_record,
    data_report,
    ensure_pad_token,
    load_records,
    load_records_with_locations,
    make_supervised_data_module,
    tokenize_conversation,
    unknown_share,
)
from lorakit.models import TASK_DIR, TINY_DIR, load_base


@pytest.fixture(scope="module")
def tokenizer():
    return load_base("tiny")[1]


def test_labels_only_on_the_reply(tokenizer):
    messages = check_record(GOOD, "x")
    ids, labels, truncated = tokenize_conversation(tokenizer, messages, max_length=512)
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False) and not truncated
    prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
    n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])  # the prompt as generation will see it
    assert labels[:n] == [IGNORE_INDEX] * n and labels[n:] == ids[n:]
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


EXAMPLES = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]


@pytest.mark.parametrize("as_tensors", [False, True], ids=["lists", "tensors"])
def test_collator_pads_right(as_tensors):
    examples = [{k: torch.tensor(v) if as_tensors else v for k, v in e.items()} for e in EXAMPLES]
    batch = DataCollator(pad_token_id=0)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())
    assert DataCollator(pad_token_id=0, pad_to_multiple_of=8)(examples)["input_ids"].shape == (2, 8)


def test_collator_equals_transformers_seq2seq_collator_on_right_padding(tokenizer):
    """The oracle: DataCollatorForSeq2Seq, which pads through tokenizer.pad and labels with -100, does the same job
    when tokenizer.padding_side is "right"; lorakit's pads right whatever that setting says."""
    from transformers import DataCollatorForSeq2Seq

    dataset = SupervisedDataset(load_records(TASK_DIR / "eval.jsonl")[:16], tokenizer, 64)
    examples = [{k: dataset[i][k].tolist() for k in ("input_ids", "labels")} for i in range(16)]
    ours = DataCollator(tokenizer.pad_token_id)(examples)
    theirs = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX,
                                    return_tensors="pt")(examples)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


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


TRAILING_HUMAN = conv(("human", "q"), ("gpt", "a"), ("human", "and then?"))


@pytest.mark.parametrize("suffix, where", [(".jsonl", ":3"), (".json", " record 1")])
@pytest.mark.parametrize("load", [
    lambda path, _: load_records(path, for_eval=True),
    lambda path, _: load_records_with_locations(path, for_eval=True),
    lambda path, tokenizer: make_supervised_data_module(tokenizer, SimpleNamespace(
        data_path=TASK_DIR / "train.jsonl", eval_data_path=path, lazy_preprocess=False)),
], ids=["load_records", "with_locations", "data_module"])
def test_eval_record_without_final_answer_is_refused_with_its_line(tmp_path, tokenizer, suffix, where, load):
    path = tmp_path / f"eval{suffix}"
    if suffix == ".jsonl":
        write_lines(path, [json.dumps(GOOD), "", json.dumps(TRAILING_HUMAN)])
    else:
        path.write_text(json.dumps([GOOD, TRAILING_HUMAN]))
    assert len(load_records(path)) == 2  # as training data the trailing question is harmless: it gets no labels
    with pytest.raises(DataError) as error:
        load(path, tokenizer)
    assert str(error.value).startswith(f"{path}{where}: an evaluation record must end with its \"gpt\" answer")
    assert 'its last turn is from "human"; add the answer or drop the trailing turn' in str(error.value)


def crafted(tmp_path, tokenizer, bad: list[dict], max_length: int, lazy: bool = False):
    """A dataset of GOOD, a blank line, then the bad records from line 3 on, read in full (lazy ones too)."""
    path = write_lines(tmp_path / "train.jsonl", [json.dumps(GOOD), ""] + [json.dumps(r) for r in bad])
    records, locations = load_records_with_locations(path)
    dataset = (LazySupervisedDataset if lazy else SupervisedDataset)(records, tokenizer, max_length, str(path),
                                                                      locations)
    for i in range(len(dataset)):
        dataset[i]  # a lazy dataset tokenises (and refuses) on access
    return path, dataset


# (the record on line 3, max_length, "error" / "warning" / None, what the DataError or a report line says; {loc} is
# the record's file:line)
CHECKS = [
    (conv(("human", "reverse: abc"), ("gpt", "ab中x")), 64, "warning",
     "have replies the tokenizer cannot spell (first: {loc}, characters '中'); they become '<unk>'"),
    (conv(("human", "q"), ("gpt", "中x")), 64, "warning", "(first: {loc}, characters '中')"),  # 50% is not "mostly"
    (conv(("human", "q"), ("gpt", "中文x")), 64, "error",
     "{loc}: 67% of a reply's tokens are the unknown token '<unk>' (from characters '中' '文'), so the model would "
     "learn to answer '<unk>'; this tokenizer cannot spell these characters; remove them or use a model whose "
     "tokenizer covers them"),
    (conv(("human", "q1"), ("gpt", "fine"), ("human", "q2"), ("gpt", "😀😀")), 64, "error",
     "{loc}: 100% of a reply's tokens"),  # judged per reply: the record as a whole is only 1/3 unknown
    (conv(("system", "中文"), ("human", "中文?"), ("gpt", "ok")), 64, None, ""),  # unknowns in prompts teach nothing
    (conv(("human", "reverse: " + "x" * 60), ("gpt", "x")), 32, "warning",
     "have no reply tokens left after truncation to --model_max_length 32 (first: {loc}), so they train on nothing; "
     "raise --model_max_length or shorten their prompts"),
    (conv(("human", "q"), ("gpt", "y" * 60)), 32, "warning",
     "are longer than --model_max_length 32 tokens and were truncated (first: {loc}); raise --model_max_length or "
     "shorten them"),
]


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
@pytest.mark.parametrize("bad, max_length, kind, says", CHECKS, ids=[f"{c[2]}-{i}" for i, c in enumerate(CHECKS)])
def test_checks_name_the_record_line(tmp_path, tokenizer, lazy, bad, max_length, kind, says):
    loc = f"{tmp_path / 'train.jsonl'}:3"
    if kind == "error":
        with pytest.raises(DataError) as error:
            crafted(tmp_path, tokenizer, [bad, GOOD], max_length, lazy)
        assert says.format(loc=loc) in str(error.value)
        return
    _, dataset = crafted(tmp_path, tokenizer, [bad, GOOD], max_length, lazy)
    report = data_report(dataset)
    assert report == [] if kind is None else any(says.format(loc=loc) in line for line in report), report


def test_counts_and_report_on_a_crafted_file(tmp_path, tokenizer):
    long_reply, long_prompt = conv(("human", "q"), ("gpt", "y" * 60)), conv(("human", "p" * 40), ("gpt", "x"))
    bad = [long_reply, long_prompt, conv(("human", "q"), ("gpt", "ab中x")), GOOD, conv(("human", "q"), ("gpt", "😀x")),
           long_prompt]  # lines 3..8
    path, dataset = crafted(tmp_path, tokenizer, bad, max_length=32)
    assert (len(dataset), dataset.seen, dataset.truncated, dataset.no_labels, dataset.unknown) == (7, 7, 3, 2, 2)
    assert dataset.first == {"truncated": f"{path}:3", "no_labels": f"{path}:4", "unknown": f"{path}:5"}
    assert dataset.unknown_chars == ["中"] and dataset.where(1) == f"{path}:3"
    assert (dataset[2]["labels"] == IGNORE_INDEX).all()  # the premise: such a record adds 0 to loss and gradient
    assert data_report(dataset) == [
        f"{path}: 3 of 7 records are longer than --model_max_length 32 tokens and were truncated (first: {path}:3); "
        "raise --model_max_length or shorten them",
        f"{path}: 2 of 7 records have no reply tokens left after truncation to --model_max_length 32 (first: "
        f"{path}:4), so they train on nothing; raise --model_max_length or shorten their prompts",
        f"{path}: 2 of 7 records have replies the tokenizer cannot spell (first: {path}:5, characters '中'); they "
        "become '<unk>', which the model then learns to say; remove them or use a model whose tokenizer covers them"]


def test_lazy_report_counts_only_what_was_read(tmp_path, tokenizer):
    path = write_lines(tmp_path / "train.jsonl", [json.dumps(conv(("human", "q"), ("gpt", "ab中x")))] * 4)
    dataset = LazySupervisedDataset(load_records(path), tokenizer, 64, str(path))  # no locations: "record i"
    assert data_report(dataset) == []  # nothing read yet: the up-front report needs SupervisedDataset
    dataset[1]
    assert data_report(dataset) == [f"{path}: 1 of 1 records read so far have replies the tokenizer cannot spell "
                                    f"(first: {path} record 1, characters '中'); they become '<unk>', which the "
                                    "model then learns to say; remove them or use a model whose tokenizer covers them"]


def test_nothing_left_to_learn_is_refused(tmp_path, tokenizer):
    path = write_lines(tmp_path / "train.jsonl", ["", *[json.dumps(conv(("human", "p" * 40), ("gpt", "x")))] * 2])
    records, locations = load_records_with_locations(path)
    with pytest.raises(DataError) as error:
        SupervisedDataset(records, tokenizer, 32, str(path), locations)
    assert str(error.value) == (f"{path}: none of its 2 records has a reply token left after truncation to "
                                f"--model_max_length 32 (first: {path}:2), so every label is ignored and there is "
                                "nothing to learn or measure; raise --model_max_length or shorten the prompts")
    assert SupervisedDataset(records, tokenizer, 64, str(path), locations).no_labels == 0
    with pytest.raises(ValueError, match="1 locations for 2 records"):
        SupervisedDataset(records, tokenizer, 64, str(path), locations[:1])


@pytest.mark.parametrize("labels, share", [
    ([IGNORE_INDEX, 7, 8, 2], 0.0),
    ([IGNORE_INDEX, 3, 8, 2], 0.5),  # the end-of-turn token (2, special) is no part of the reply's text
    ([IGNORE_INDEX, 3, 3, 8, 2, IGNORE_INDEX, 7, 7, 7, 7, 2], 2 / 3),  # the worst reply, not the average
    ([IGNORE_INDEX, 3, 2], 1.0),
    ([IGNORE_INDEX, IGNORE_INDEX], 0.0),
])
def test_unknown_share(labels, share):
    assert unknown_share(SimpleNamespace(unk_token_id=3, all_special_ids=[1, 2, 3]), labels) == pytest.approx(share)
    assert unknown_share(SimpleNamespace(unk_token_id=None, all_special_ids=[1, 2]), labels) == 0.0


@pytest.mark.parametrize("lazy", [False, True])
def test_task_data_gives_no_warnings(tokenizer, lazy):
    args = SimpleNamespace(data_path=TASK_DIR / "train.jsonl", eval_data_path=TASK_DIR / "eval.jsonl",
                           lazy_preprocess=lazy)
    module = make_supervised_data_module(tokenizer, args)
    for dataset in (module["train_dataset"], module["eval_dataset"]):
        for i in range(len(dataset)):
            dataset[i]
        assert data_report(dataset) == [] and dataset.seen == len(dataset) in (600, 100)
        assert (dataset.truncated, dataset.no_labels, dataset.unknown, dataset.first) == (0, 0, 0, {})


# --- Both record shapes and system prompts: the same messages give the same tokens, and a system prompt is prompt ---

def test_both_shapes_give_identical_ids_and_labels_on_the_task(tmp_path, tokenizer):
    records, locations = load_records_with_locations(TASK_DIR / "eval.jsonl", for_eval=True)
    path = write_lines(tmp_path / "eval.jsonl", [json.dumps(as_messages(r)) for r in records])
    ours, theirs = SupervisedDataset(records, tokenizer, 64), SupervisedDataset(load_records(path), tokenizer, 64)
    assert len(ours) == len(theirs) == 100
    assert all(torch.equal(ours[i][k], theirs[i][k]) for i in range(100) for k in ("input_ids", "labels"))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(alphabet="abcxyz :+?", min_size=1, max_size=12).filter(str.strip), min_size=2, max_size=6),
       st.sampled_from(["none", "turn", "record"]), st.text(alphabet="be terse", min_size=1, max_size=10))
def test_property_both_shapes_tokenise_identically(tokenizer, texts, system_as, system):
    """Any dialogue, written in ShareGPT (system prompt as a first turn or a record-level "system") and in "messages",
    gives the same input_ids and labels; the system prompt and the questions are never labelled."""
    system = system if system.strip() else "s"
    turns = [("human" if i % 2 == 0 else "gpt", text) for i, text in enumerate(texts)]
    sharegpt = conv(*([("system", system)] if system_as == "turn" else []), *turns,
                    **({"system": system} if system_as == "record" else {}))
    messages = as_messages(sharegpt)
    ids, labels, _ = tokenize_conversation(tokenizer, check_record(sharegpt, "x"), 512)
    assert (ids, labels) == tokenize_conversation(tokenizer, check_record(messages, "x"), 512)[:2]
    eos = tokenizer.eos_token
    assert tokenizer.decode([i for i in labels if i != IGNORE_INDEX]) == "".join(t + eos for t in texts[1::2])


def test_system_prompt_is_rendered_and_masked(tokenizer):
    record = msgs(("system", "be terse"), ("user", "reverse: abc"), ("assistant", "cba"))
    ids, labels, _ = tokenize_conversation(tokenizer, check_record(record, "x"), 512)
    text = tokenizer.decode(ids)
    assert text.startswith(tokenizer.bos_token + "<|system|>be terse<|user|>reverse: abc<|assistant|>")
    n = len(tokenizer(text[:text.index("cba")], add_special_tokens=False)["input_ids"])  # system + question + cue
    assert labels[:n] == [IGNORE_INDEX] * n and tokenizer.decode(labels[n:]) == "cba" + tokenizer.eos_token
    without = tokenize_conversation(tokenizer, check_record(GOOD_MESSAGES, "x"), 512)[1]
    assert [i for i in labels if i != IGNORE_INDEX] == [i for i in without if i != IGNORE_INDEX]  # same targets


def test_reply_with_weight_0_is_context_not_learned(tokenizer):
    record = {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1", "weight": 0},
                           {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}
    ids, labels, _ = tokenize_conversation(tokenizer, check_record(record, "x"), 512)
    assert "a1" in tokenizer.decode(ids) and tokenizer.decode([i for i in labels if i != IGNORE_INDEX]) == (
        "a2" + tokenizer.eos_token)


NO_SYSTEM_FIX = "if the template cannot render a system role, put the system text at the start of the first user turn"


@pytest.mark.parametrize("template, says", [
    ("{% for m in messages %}{% if m['role'] != 'system' %}{{ '<|' + m['role'] + '|>' + m['content'] }}"
     "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endif %}{% endfor %}"
     "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}",
     "the chat template drops the system message, so the model would never see it; " + NO_SYSTEM_FIX),
    ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
     "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}{% endfor %}",  # Gemma 2's refusal
     "the chat template refuses this conversation (System role not supported); " + NO_SYSTEM_FIX),
])
def test_template_without_a_system_role_is_refused_with_the_records_line(tmp_path, template, says):
    tokenizer = AutoTokenizer.from_pretrained(TINY_DIR)
    tokenizer.chat_template = template
    records = [GOOD_MESSAGES, msgs(("system", "be terse"), ("user", "q"), ("assistant", "a"))]
    path = write_lines(tmp_path / "train.jsonl", [json.dumps(r) for r in records])
    assert len(SupervisedDataset(records[:1], tokenizer, 64)) == 1  # without a system prompt all is well
    loaded, locations = load_records_with_locations(path)
    with pytest.raises(DataError) as error:
        SupervisedDataset(loaded, tokenizer, 64, str(path), locations)
    assert str(error.value) == f"{path}:2: {says}"
