"""Generation and held-out exact-match accuracy for chat models.

    from lorakit.evaluate import exact_match
    accuracy = exact_match(model, tokenizer, records)   # ShareGPT or "messages" records (lorakit.records); 0.0 .. 1.0
"""

from __future__ import annotations

import torch

from lorakit.records import check_record  # records.py validates and normalises both record shapes, this scores them


def split_record(record: dict, where: str = "") -> tuple[list[dict], str]:
    """(chat messages up to the last assistant turn, that turn's reference answer) for one record of either shape.

    Args:
        record: {"conversations": [{"from", "value"}, ...]} or {"messages": [{"role", "content"}, ...]}, validated by
            lorakit.records.check_record as an evaluation record: a question, and last the assistant's answer.
        where: names the record in a DataError (a ValueError), e.g. "data/eval.jsonl:7"
            (lorakit.data.load_records_with_locations gives one per record); default: the record's id.
    """
    name = where or f"record {record.get('id', '?') if isinstance(record, dict) else record!r:.80}"
    messages = check_record(record, name, for_eval=True)  # the one validation: same messages for both shapes
    return messages[:-1], messages[-1]["content"]


@torch.no_grad()
def generate(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 16,
             batch_size: int = 64) -> list[str]:
    """Greedy replies to chat conversations (lists of {"role", "content"}), decoded without special tokens.

    Batches are left-padded so that every prompt ends where generation starts.
    """
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    replies: list[str] = []
    try:
        for start in range(0, len(conversations), batch_size):
            prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                       for c in conversations[start:start + batch_size]]
            batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            batch = batch.to(model.device)
            output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new_tokens = output[:, batch["input_ids"].shape[1]:]  # (B, new)
            replies += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return replies


def predictions(model, tokenizer, records: list[dict], max_new_tokens: int = 16,
                locations: list[str] | None = None) -> list[tuple[str, str, str]]:
    """(question, reference, prediction) for each record; locations ("file:line" per record) name bad records."""
    if locations is not None and len(locations) != len(records):
        raise ValueError(f"{len(locations)} locations for {len(records)} records; pass one per record or None")
    where = locations or [""] * len(records)
    prompts, references = zip(*(split_record(r, w) for r, w in zip(records, where, strict=True)), strict=True)
    replies = generate(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens)
    return [(p[-1]["content"], ref, rep) for p, ref, rep in zip(prompts, references, replies, strict=True)]


def exact_match(model, tokenizer, records: list[dict], max_new_tokens: int = 16,
                locations: list[str] | None = None) -> float:
    """Fraction of records whose greedy reply equals the reference answer exactly (after stripping whitespace).

    Args:
        records: conversation records of either shape (lorakit.records), each ending with its reference answer.
        locations: optional "file:line" per record (lorakit.data.load_records_with_locations), for error messages.
    """
    if not records:
        raise ValueError("exact_match needs at least one record")
    rows = predictions(model, tokenizer, records, max_new_tokens, locations)
    return sum(ref.strip() == pred for _, ref, pred in rows) / len(rows)
