"""Supervised chat data: FastChat conversation records -> token ids with labels only on the assistant replies.

    from lorakit.data import load_records, make_supervised_data_module
    records = load_records("data/task/train.jsonl")         # validated; a DataError names file:line and the fix
    module = make_supervised_data_module(tokenizer, data_args)   # {train_dataset, eval_dataset, data_collator}

A record (FastChat / ShareGPT style), one per line in .jsonl or a list in .json:
    {"id": "reverse-0", "conversations": [{"from": "human", "value": "reverse: dacz"}, {"from": "gpt", "value": "zcad"}]}

Tokenisation renders the conversation with the tokenizer's own chat template and splits it at the turn boundaries:
for each assistant turn k, prompt_k = template(turns before k, add_generation_prompt) and full_k = template(turns up to
k). Characters in [len(prompt_k), len(full_k)) are the reply (and its end-of-turn token): they get labels; everything
else gets label -100, which the loss ignores. The seed (FastChat train.py) instead re-tokenised string pieces with a
"-2 hard-coded for the LLaMA tokenizer" offset, which silently mis-masks every other tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

IGNORE_INDEX = -100  # the label value torch.nn.CrossEntropyLoss (and transformers) skips
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
EXAMPLE = '{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}'


class DataError(ValueError):
    """A data file or record that cannot be used; the message names file:line (or record index) and the fix."""


def check_record(record: object, where: str) -> list[dict]:
    """Validate one record and return its turns as chat messages [{"role", "content"}]; DataError otherwise."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object like {EXAMPLE}, got {type(record).__name__}")
    turns = record.get("conversations")
    if turns is None:
        raise DataError(f"{where}: missing key \"conversations\" (keys: {sorted(record)}); each record needs "
                        f"{EXAMPLE}")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: \"conversations\" must be a non-empty list of turns like {EXAMPLE}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{where}: turn {i} must be an object with \"from\" and \"value\", got {turn!r:.80}")
        role = ROLES.get(turn["from"]) if isinstance(turn["from"], str) else None
        if role is None:
            raise DataError(f"{where}: turn {i} has unknown role \"from\": {turn['from']!r}; use one of "
                            f"{sorted(ROLES)} (\"human\" asks, \"gpt\" answers)")
        if not isinstance(turn["value"], str) or not turn["value"].strip():
            raise DataError(f"{where}: turn {i} ({turn['from']}) has an empty \"value\"; give it text or drop the "
                            "turn (and its reply)")
        messages.append({"role": role, "content": turn["value"]})
    dialogue = messages[1:] if messages[0]["role"] == "system" else messages
    if not dialogue or dialogue[0]["role"] != "user":
        got = repr(turns[len(messages) - len(dialogue)]["from"]) if dialogue else "nothing"
        raise DataError(f"{where}: the first turn (after an optional system turn) must be from \"human\", got {got}; "
                        "drop the leading reply or add the question it answers")
    for i, message in enumerate(dialogue):
        if message["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise DataError(f"{where}: turns must alternate human, gpt, human, ...; turn "
                            f"{i + len(messages) - len(dialogue)} breaks it; merge consecutive turns of one speaker")
    if len(dialogue) < 2:
        raise DataError(f"{where}: no \"gpt\" reply to learn from; add the answer turn or drop the record")
    return messages


def load_records(path: str | Path) -> list[dict]:
    """Read and validate FastChat records from .jsonl (one per line, blank lines allowed) or .json (a list).

    Raises DataError naming path:line (.jsonl) or path record N (.json) and what to do for any problem.
    """
    path = Path(path)
    if path.suffix not in (".json", ".jsonl"):
        raise DataError(f"{path}: unknown data format {path.suffix!r}; use .jsonl (one record per line) or .json "
                        "(a list of records)")
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass --data_path to a .jsonl or .json file of conversation records")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); re-save it as UTF-8") from None
    records: list[dict] = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not JSON ({error.msg} at column {error.colno}); each line must be "
                                f"one record like {EXAMPLE}") from None
            check_record(record, f"{path}:{number}")
            records.append(record)
    else:
        try:
            data = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{error.lineno}: not JSON ({error.msg} at column {error.colno}); a .json file "
                            f"must hold a list of records like [{EXAMPLE}]") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json data file must hold a list of records, got {type(data).__name__}; "
                            "wrap the records in [ ... ] or use .jsonl")
        for index, record in enumerate(data):
            check_record(record, f"{path} record {index}")
        records = data
    if not records:
        raise DataError(f"{path}: no records; the file is empty. Add records like {EXAMPLE}")
    return records


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated) of one conversation through the tokenizer's chat template.

    Args:
        tokenizer: a tokenizer with a chat_template (its special tokens are parsed from the rendered text).
        messages: chat messages [{"role", "content"}], as returned by check_record.
        max_length: keep at most this many tokens (the tail is cut, as the seed's truncation did).
    Returns:
        input_ids (T,), labels (T,) equal to input_ids on assistant replies and IGNORE_INDEX elsewhere, and whether
        the conversation was longer than max_length.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{type(tokenizer).__name__} has no chat_template; set tokenizer.chat_template (a Jinja "
                         "template) or use an instruct/chat checkpoint's tokenizer")
    render = tokenizer.apply_chat_template
    full = render(messages, tokenize=False)
    cuts, spans = [0], []  # character boundaries; spans[i] says whether piece i is a reply
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, upto = render(messages[:k], add_generation_prompt=True, tokenize=False), render(messages[:k + 1],
                                                                                                tokenize=False)
        if not (full.startswith(upto) and upto.startswith(prompt) and len(prompt) >= cuts[-1]):
            raise ValueError("the chat template is not prefix-stable (rendering fewer turns is not a prefix of the "
                             "full conversation), so replies cannot be located; use a template without "
                             "turn-dependent text, or mask labels yourself")
        cuts += [len(prompt), len(upto)]
        spans += [False, True]
    cuts.append(len(full))
    spans.append(False)
    input_ids: list[int] = []
    labels: list[int] = []
    for (start, end), is_reply in zip(zip(cuts[:-1], cuts[1:], strict=True), spans, strict=True):
        if start == end:
            continue
        # each piece is tokenised alone, as at inference: the prompt is encoded, then the reply is generated after it
        ids = tokenizer(full[start:end], add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if is_reply else [IGNORE_INDEX] * len(ids)
    truncated = len(input_ids) > max_length
    return input_ids[:max_length], labels[:max_length], truncated


def _tensors(ids: list[int], labels: list[int]) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
            "attention_mask": torch.ones(len(ids), dtype=torch.long)}


class SupervisedDataset(Dataset):
    """All records tokenised up front; `truncated` counts records cut to max_length."""

    def __init__(self, records: list[dict], tokenizer, max_length: int, source: str = "records"):
        self.items, self.truncated = [], 0
        for index, record in enumerate(records):
            ids, labels, cut = tokenize_conversation(tokenizer, check_record(record, f"{source} record {index}"),
                                                     max_length)
            self.items.append(_tensors(ids, labels))
            self.truncated += cut

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


class LazySupervisedDataset(Dataset):
    """Records tokenised on first access and cached (--lazy_preprocess): start-up cost independent of data size."""

    def __init__(self, records: list[dict], tokenizer, max_length: int, source: str = "records"):
        self.records, self.tokenizer, self.max_length, self.source = records, tokenizer, max_length, source
        self.cache: dict[int, dict[str, torch.Tensor]] = {}
        self.truncated = 0  # among the records tokenised so far

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i not in self.cache:
            messages = check_record(self.records[i], f"{self.source} record {i}")
            ids, labels, cut = tokenize_conversation(self.tokenizer, messages, self.max_length)
            self.cache[i] = _tensors(ids, labels)
            self.truncated += cut
        return self.cache[i]


@dataclass
class DataCollator:
    """Right-pad a list of examples into a batch: input_ids with pad_token_id, labels with IGNORE_INDEX, mask 0."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.full((len(examples), width), self.pad_token_id, dtype=torch.long),  # (B, T)
            "labels": torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long),  # (B, T)
            "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),  # (B, T)
        }
        for row, example in enumerate(examples):
            for key in batch:
                batch[key][row, : len(example[key])] = example[key]
        return batch


def ensure_pad_token(tokenizer) -> str:
    """Give the tokenizer a pad token if it has none, and say which.

    The seed set pad_token = unk_token, which is None for tokenizers without <unk> (Llama-3, Qwen, GPT-2) and then fails
    at the first padded batch. Reusing eos is safe here because the collator pads labels with IGNORE_INDEX itself
    instead of deriving them from input_ids == pad_token_id, so real end-of-turn tokens are still learned.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token to a token of "
                             "its vocabulary")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.pad_token


def make_supervised_data_module(tokenizer, data_args) -> dict:
    """{train_dataset, eval_dataset (None without eval_data_path), data_collator} for transformers.Trainer.

    Args:
        tokenizer: with a chat template; its model_max_length is the truncation length.
        data_args: anything with data_path, eval_data_path ("" for none) and lazy_preprocess (see lorakit.args).
    """
    ensure_pad_token(tokenizer)
    dataset_cls = LazySupervisedDataset if data_args.lazy_preprocess else SupervisedDataset
    max_length = tokenizer.model_max_length
    train = dataset_cls(load_records(data_args.data_path), tokenizer, max_length, str(data_args.data_path))
    evaluation = None
    if data_args.eval_data_path:
        evaluation = dataset_cls(load_records(data_args.eval_data_path), tokenizer, max_length,
                                 str(data_args.eval_data_path))
    return {"train_dataset": train, "eval_dataset": evaluation,
            "data_collator": DataCollator(pad_token_id=tokenizer.pad_token_id)}
