"""The corpus and the fine-tuning task: deterministic, well-formed, and no held-out word in train."""

import itertools

from lorakit import models, tasks


def test_reversal_task_is_deterministic_and_matches_the_committed_files():
    train, held_out = tasks.reversal_task()
    assert tasks.reversal_task() == (train, held_out)
    assert tasks.read_jsonl(models.TASK_DIR / "train.jsonl") == train
    assert tasks.read_jsonl(models.TASK_DIR / "eval.jsonl") == held_out


def test_held_out_words_are_unseen_and_answers_are_reversals():
    train, held_out = tasks.reversal_task()
    words = lambda records: {r["conversations"][0]["value"].removeprefix(tasks.TASK_PROMPT) for r in records}  # noqa: E731
    assert not words(train) & words(held_out)
    for r in train + held_out:
        question, answer = (turn["value"] for turn in r["conversations"])
        word = question.removeprefix(tasks.TASK_PROMPT)
        assert answer == word[::-1] and len(set(word)) == len(word) and len(word) in tasks.TASK_LENGTHS
        assert [turn["from"] for turn in r["conversations"]] == ["human", "gpt"]


def test_pretraining_stream_is_deterministic_and_never_asks_the_task():
    first = list(itertools.islice(tasks.pretraining_pairs(3), 500))
    assert first == list(itertools.islice(tasks.pretraining_pairs(3), 500))
    assert not any(q.startswith(tasks.TASK_PROMPT) for q, _ in first)
    kinds = {q.split(":")[0].split(" ")[0] for q, _ in first if ":" in q}
    assert {"copy", "upper", "first", "last", "length", "after", "before", "add"} <= kinds


def test_skill_answers_are_correct():
    for question, answer in itertools.islice(tasks.pretraining_pairs(5), 300):
        if question.startswith("before "):
            letter, word = question[7], question.split(": ")[1]
            assert word[word.index(letter) - 1] == answer
        elif question.startswith("after "):
            letter, word = question[6], question.split(": ")[1]
            assert word[word.index(letter) + 1] == answer
        elif question.startswith("add: "):
            a, b = question[5:].split("+")
            assert int(a) + int(b) == int(answer)
