"""The built-in corpus: synthetic chat skills the tiny base model is pretrained on, and the fine-tuning task.

The base model learns small, checkable skills on lower-case "words" of distinct letters: copy, upper-case, first and
last letter, length, the letter before or after a given one, two-number addition, and a handful of invented facts.
The fine-tuning task is *reversal* ("reverse: kfdq" -> "qdfk"), which the base never saw. It re-routes skills the base
already has (last letter, then "the letter before the one I just wrote"), which is what makes it learnable by a
low-rank update of q_proj and v_proj alone — the same situation as fine-tuning a real pretrained model.

Every record is in the FastChat conversation format:
    {"id": "reverse-0", "conversations": [{"from": "human", "value": "reverse: kfdq"}, {"from": "gpt", "value": "qdfk"}]}

Rebuild the task files with:  python -m lorakit.models task
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable, Iterator
from pathlib import Path

LETTERS = string.ascii_lowercase

# Invented facts: the base model can only know them from pretraining, so a correct answer shows it was trained.
FACTS: dict[str, str] = {
    "capital of Zorbia": "Quelt",
    "capital of Vantra": "Miro",
    "capital of Olluk": "Tesh",
    "capital of Brisca": "Paldo",
    "capital of Numeria": "Six",
    "capital of Kestov": "Arn",
    "color of a glimmet": "teal",
    "color of a worbel": "amber",
    "color of a snorp": "violet",
    "color of a drell": "grey",
    "sound of a glimmet": "pip",
    "sound of a worbel": "hoom",
    "sound of a snorp": "fzz",
    "sound of a drell": "tok",
}

TASK_PROMPT = "reverse: "
TASK_LENGTHS = (3, 4, 5)


def random_word(rng: random.Random, min_len: int = 2, max_len: int = 8) -> str:
    """A 'word' of distinct lower-case letters, so that 'the letter before x' has one answer."""
    return "".join(rng.sample(LETTERS, rng.randint(min_len, max_len)))


def _copy(rng: random.Random) -> tuple[str, str]:
    word = random_word(rng)
    return f"copy: {word}", word


def _upper(rng: random.Random) -> tuple[str, str]:
    word = random_word(rng)
    return f"upper: {word}", word.upper()


def _first(rng: random.Random) -> tuple[str, str]:
    word = random_word(rng)
    return f"first: {word}", word[0]


def _last(rng: random.Random) -> tuple[str, str]:
    word = random_word(rng)
    return f"last: {word}", word[-1]


def _length(rng: random.Random) -> tuple[str, str]:
    word = random_word(rng, 1, 9)
    return f"length: {word}", str(len(word))


def _after(rng: random.Random) -> tuple[str, str]:
    word = random_word(rng, 2, 8)
    i = rng.randrange(len(word) - 1)
    return f"after {word[i]}: {word}", word[i + 1]


def _before(rng: random.Random) -> tuple[str, str]:
    word = random_word(rng, 2, 8)
    i = rng.randrange(1, len(word))
    return f"before {word[i]}: {word}", word[i - 1]


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(50), rng.randrange(50)
    return f"add: {a}+{b}", str(a + b)


def _fact(rng: random.Random) -> tuple[str, str]:
    question = rng.choice(sorted(FACTS))
    return f"{question}?", FACTS[question]


# (skill, weight): the letter-routing skills that reversal re-uses get the most practice. With before/after at 4/3
# and 4,000 steps, LoRA reached 69-84% across seeds; at 6/4 and 6,000 steps, 97-100% (README, Results).
SKILLS: list[tuple[Callable[[random.Random], tuple[str, str]], int]] = [
    (_copy, 2), (_upper, 2), (_first, 1), (_last, 2), (_length, 1),
    (_after, 4), (_before, 6), (_add, 2), (_fact, 1),
]


def pretraining_pairs(seed: int) -> Iterator[tuple[str, str]]:
    """An endless, deterministic stream of (question, answer) pairs drawn from SKILLS."""
    rng = random.Random(seed)
    skills = [skill for skill, _ in SKILLS]
    weights = [weight for _, weight in SKILLS]
    while True:
        yield rng.choices(skills, weights)[0](rng)


def record(record_id: str, question: str, answer: str) -> dict:
    """One FastChat conversation record."""
    return {"id": record_id, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def reversal_task(n_train: int = 600, n_eval: int = 100, seed: int = 1234) -> tuple[list[dict], list[dict]]:
    """Train and held-out eval records for 'reverse: <word>' on words of 3-5 distinct letters.

    No eval word appears in train, so exact match on eval measures the skill, not memorisation.
    """
    rng = random.Random(seed)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < n_train + n_eval:
        word = "".join(rng.sample(LETTERS, rng.choice(TASK_LENGTHS)))
        if word not in seen:
            seen.add(word)
            words.append(word)
    records = [record(f"reverse-{i}", TASK_PROMPT + word, word[::-1]) for i, word in enumerate(words)]
    return records[:n_train], records[n_train:]


def write_jsonl(records: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
