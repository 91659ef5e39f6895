"""Supervised chat data: conversation records -> token ids with labels only on the assistant replies.

    from lorakit.data import load_records, make_supervised_data_module
    records = load_records("data/task/train.jsonl")         # validated; a DataError names file:line and the fix
    module = make_supervised_data_module(tokenizer, data_args)   # {train_dataset, eval_dataset, data_collator}
    for line in data_report(module["train_dataset"]): print(line)  # truncation, nothing to learn, unknown chars

Reading and validating the records is lorakit.records (re-exported here): it makes either shape, ShareGPT or
"messages", the same chat messages, so the tokens are the same too. This module tokenises and batches them.

Tokenisation renders the conversation with the tokenizer's own chat template and splits it at the turn boundaries: for
each assistant turn k, prompt_k = template(turns before k, add_generation_prompt) and full_k = template(turns up to k).
Characters in [len(prompt_k), len(full_k)) are the reply (and its end-of-turn token): they get labels; everything else
(system prompt, questions, replies marked "weight": 0) gets label -100, which the loss ignores. The seed (FastChat
train.py) re-tokenised pieces with a "-2 hard-coded for the LLaMA tokenizer" offset, mis-masking any other tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

# ROLES and load_records are re-exported: `from lorakit.data import load_records` is what the notebooks teach
try:
    from lorakit.records import ROLES, DataError, check_record, load_records, load_records_with_locations  # noqa: F401
except ModuleNotFoundError:  # copied out of lorakit: records.py sits next to this file (README, "Copying a module")
    from records import ROLES, DataError, check_record, load_records, load_records_with_locations  # noqa: F401

IGNORE_INDEX = -100  # the label value torch.nn.CrossEntropyLoss (and transformers) skips
NO_SYSTEM = "if the template cannot render a system role, put the system text at the start of the first user turn"


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated) of one conversation through the tokenizer's chat template.

    Args:
        tokenizer: a tokenizer with a chat_template (its special tokens are parsed from the rendered text).
        messages: chat messages [{"role", "content"}] from check_record; a reply with "weight": 0 is not learned.
        max_length: keep at most this many tokens (the tail is cut, as the seed's truncation did).
    Returns:
        input_ids (T,), labels (T,) equal to input_ids on assistant replies and IGNORE_INDEX elsewhere, and whether
        the conversation was longer than max_length.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{type(tokenizer).__name__} has no chat_template; set tokenizer.chat_template (a Jinja "
                         "template) or use an instruct/chat checkpoint's tokenizer")
    render = tokenizer.apply_chat_template
    try:
        full = render(messages, tokenize=False)
    except Exception as error:  # jinja2's TemplateError (not imported: data.py needs only torch): raise_exception
        if type(error).__module__.startswith("jinja2"):
            raise ValueError(f"the chat template refuses this conversation ({error}); {NO_SYSTEM}") from error
        raise
    if messages[0]["role"] == "system" and messages[0]["content"].strip() not in full:
        raise ValueError(f"the chat template drops the system message, so the model would never see it; {NO_SYSTEM}")
    cuts, spans = [0], []  # character boundaries; spans[i] says whether piece i is a reply
    for k, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("weight") == 0:
            continue
        prompt = render(messages[:k], add_generation_prompt=True, tokenize=False)
        upto = full if k == len(messages) - 1 else render(messages[:k + 1], tokenize=False)  # one render fewer
        if not (full.startswith(upto) and upto.startswith(prompt) and len(prompt) >= cuts[-1]):
            raise ValueError("the chat template is not prefix-stable (rendering fewer turns is not a prefix of the "
                             "full conversation), so replies cannot be located; use a template without "
                             "turn-dependent text, or mask labels yourself")
        cuts += [len(prompt), len(upto)]
        spans += [False, True]
    cuts, spans = [*cuts, len(full)], [*spans, False]
    input_ids: list[int] = []
    labels: list[int] = []
    for (start, end), is_reply in zip(zip(cuts[:-1], cuts[1:], strict=True), spans, strict=True):
        if start == end:
            continue
        # each piece is tokenised alone, as at inference: the prompt is encoded, then the reply is generated after it;
        # verbose=False: transformers' "longer than the maximum" warning is noise, truncation is counted and reported
        ids = tokenizer(full[start:end], add_special_tokens=False, verbose=False)["input_ids"]
        input_ids += ids
        labels += ids if is_reply else [IGNORE_INDEX] * len(ids)
    truncated = len(input_ids) > max_length
    return input_ids[:max_length], labels[:max_length], truncated


class _CheckedDataset(Dataset):
    """Tokenises record i through _tokenise, which refuses a reply the tokenizer cannot spell and counts, among the
    records tokenised so far (`seen`), those truncated, those left with no label, and those with unknown reply tokens.
    """

    def __init__(self, records: list[dict], tokenizer, max_length: int, source: str = "records",
                 locations: list[str] | None = None):
        if locations is not None and len(locations) != len(records):
            raise ValueError(f"{len(locations)} locations for {len(records)} records; pass one per record (as "
                             "load_records_with_locations returns them) or None")
        self.records, self.tokenizer, self.max_length, self.source = records, tokenizer, max_length, source
        self.locations = locations
        self.seen = self.truncated = self.no_labels = self.unknown = 0
        self.first: dict[str, str] = {}  # "truncated" / "no_labels" / "unknown" -> where the first such record is
        self.unknown_chars: list[str] = []  # what became the unknown token in the first record with unknown tokens

    def __len__(self) -> int:
        return len(self.records)

    def where(self, i: int) -> str:
        """"file:line" of record i when the locations are known, else "source record i"."""
        return self.locations[i] if self.locations else f"{self.source} record {i}"

    def _tokenise(self, i: int) -> dict[str, torch.Tensor]:
        where = self.where(i)
        messages = check_record(self.records[i], where)
        try:
            ids, labels, cut = tokenize_conversation(self.tokenizer, messages, self.max_length)
        except ValueError as error:  # the template and this record do not fit: name the record (lorakit-train: exit 2)
            raise DataError(f"{where}: {error}") from error
        share = unknown_share(self.tokenizer, labels)
        chars = unknown_characters(self.tokenizer, messages) if share else []
        if share > 0.5:
            unk = self.tokenizer.unk_token
            raise DataError(f"{where}: {share:.0%} of a reply's tokens are the unknown token {unk!r} (from "
                            f"{_show(chars)}), so the model would learn to answer {unk!r}; this tokenizer cannot "
                            "spell these characters; remove them or use a model whose tokenizer covers them")
        empty = all(label == IGNORE_INDEX for label in labels)
        self.seen += 1
        self.truncated += cut
        self.no_labels += empty
        self.unknown += share > 0
        for kind, hit in (("truncated", cut), ("no_labels", empty), ("unknown", share > 0)):
            if hit:
                self.first.setdefault(kind, where)
        self.unknown_chars = self.unknown_chars or chars
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "attention_mask": torch.ones(len(ids), dtype=torch.long)}


class SupervisedDataset(_CheckedDataset):
    """All records tokenised up front, so data_report covers them all; DataError if no record has a label left.

    Args (both datasets): records, a tokenizer with a chat template, max_length in tokens, source (the file, for
    messages) and locations ("file:line" per record, from load_records_with_locations; else "source record i").
    """

    def __init__(self, records: list[dict], tokenizer, max_length: int, source: str = "records",
                 locations: list[str] | None = None):
        super().__init__(records, tokenizer, max_length, source, locations)
        self.items = [self._tokenise(i) for i in range(len(records))]
        if self.items and self.no_labels == len(self.items):
            # every label is IGNORE_INDEX: the loss is 0 (or undefined), the gradient 0, and the run would look fine
            raise DataError(f"{source}: none of its {len(self.items)} records has a reply token left after truncation "
                            f"to --model_max_length {max_length} (first: {self.first['no_labels']}), so every label "
                            "is ignored and there is nothing to learn or measure; raise --model_max_length or shorten "
                            "the prompts")

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


class LazySupervisedDataset(_CheckedDataset):
    """Records tokenised on first access and cached (--lazy_preprocess): start-up cost independent of data size.

    A reply the tokenizer cannot spell raises DataError when its record is first read, i.e. during training; the
    counters cover only the records read so far in this process (DataLoader workers count in their own copies), so
    the up-front data_report, and the refusal of a file with nothing to learn, need SupervisedDataset.
    """

    def __init__(self, records: list[dict], tokenizer, max_length: int, source: str = "records",
                 locations: list[str] | None = None):
        super().__init__(records, tokenizer, max_length, source, locations)
        self.cache: dict[int, dict[str, torch.Tensor]] = {}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i not in self.cache:
            self.cache[i] = self._tokenise(i)
        return self.cache[i]


@dataclass
class DataCollator:
    """Right-pad examples into a batch: input_ids with pad_token_id, labels with IGNORE_INDEX, attention_mask 0.

    The one collator of the course (lorakit-train, the tiny model's pretraining, the SmolLM2 demo, the notebooks).
    An example is {"input_ids": (T,), "labels": (T,)}, lists or tensors, unpadded: its attention_mask is 1 over its T
    tokens. transformers' DataCollatorForSeq2Seq pads on whichever side tokenizer.padding_side says (generation sets
    it to "left") and goes through tokenizer.pad; this one always pads right and needs only the pad id.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.full((len(examples), width), self.pad_token_id, dtype=torch.long),  # (B, T)
            "labels": torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long),  # (B, T)
            "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),  # (B, T)
        }
        for row, example in enumerate(examples):
            length = len(example["input_ids"])
            batch["input_ids"][row, :length] = torch.as_tensor(example["input_ids"])
            batch["labels"][row, :length] = torch.as_tensor(example["labels"])
            batch["attention_mask"][row, :length] = 1
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

    def dataset(path: str | Path, for_eval: bool) -> Dataset:
        records, locations = load_records_with_locations(path, for_eval)
        return dataset_cls(records, tokenizer, max_length, str(path), locations)

    train = dataset(data_args.data_path, for_eval=False)
    # for_eval: the CLI scores this file by exact match after training, so a record it cannot score is refused now
    evaluation = dataset(data_args.eval_data_path, for_eval=True) if data_args.eval_data_path else None
    return {"train_dataset": train, "eval_dataset": evaluation,
            "data_collator": DataCollator(pad_token_id=tokenizer.pad_token_id)}


# --- Checks and the report: what the tokenised records say about the run (the CLI prints data_report's lines) ---

def unknown_share(tokenizer, labels: list[int]) -> float:
    """Largest fraction of unknown tokens among the text tokens of any one reply in labels (T,), each maximal run of
    non-IGNORE_INDEX labels being one reply; 0.0 for tokenizers without an unk token (byte-level ones spell anything).
    """
    unk = tokenizer.unk_token_id
    if unk is None:
        return 0.0
    special = set(tokenizer.all_special_ids) - {unk}  # the end-of-turn token is no part of what the reply says
    worst, reply = 0.0, []
    for label in [*labels, IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            reply += [label] if label not in special else []
        elif reply:
            worst, reply = max(worst, reply.count(unk) / len(reply)), []
    return worst


def unknown_characters(tokenizer, messages: list[dict]) -> list[str]:
    """The characters of the assistant replies that the tokenizer encodes, on their own, as its unknown token."""
    text = "".join(m["content"] for m in messages if m["role"] == "assistant" and m.get("weight") != 0)
    return [c for c in dict.fromkeys(text)
            if tokenizer.unk_token_id in tokenizer(c, add_special_tokens=False)["input_ids"]]


def _show(chars: list[str]) -> str:
    # repr makes invisible characters (zero-width spaces, control characters) visible in a one-line message
    shown = " ".join(repr(c) for c in chars[:8]) + (f" and {len(chars) - 8} more" if len(chars) > 8 else "")
    return f"characters {shown}" if chars else "whole words"


def data_report(dataset: Dataset) -> list[str]:
    """One warning line per thing in the data a run should know about ([] when none): records truncated, records left
    with nothing to learn, replies with characters the tokenizer cannot spell.

    A SupervisedDataset has tokenised every record, so its report is complete before training; a LazySupervisedDataset
    (--lazy_preprocess) covers only the records read so far: none before training starts. Other datasets get [].
    """
    if not isinstance(dataset, _CheckedDataset):
        return []
    d, first = dataset, dataset.first
    counted = f"{d.seen} records" + (" read so far" if isinstance(d, LazySupervisedDataset) else "")
    lines = []
    if d.truncated:
        lines.append(f"{d.source}: {d.truncated} of {counted} are longer than --model_max_length {d.max_length} tokens "
                     f"and were truncated (first: {first['truncated']}); raise --model_max_length or shorten them")
    if d.no_labels:
        lines.append(f"{d.source}: {d.no_labels} of {counted} have no reply tokens left after truncation to "
                     f"--model_max_length {d.max_length} (first: {first['no_labels']}), so they train on nothing; "
                     "raise --model_max_length or shorten their prompts")
    if d.unknown:
        unk = d.tokenizer.unk_token
        lines.append(f"{d.source}: {d.unknown} of {counted} have replies the tokenizer cannot spell (first: "
                     f"{first['unknown']}, {_show(d.unknown_chars)}); they become {unk!r}, which the model then learns "
                     "to say; remove them or use a model whose tokenizer covers them")
    return lines
