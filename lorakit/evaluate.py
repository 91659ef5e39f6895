"""Generation and held-out exact-match accuracy for chat models.

    from lorakit.evaluate import exact_match
    accuracy = exact_match(model, tokenizer, records)   # records in FastChat format; 0.0 .. 1.0
"""

from __future__ import annotations

import torch

from lorakit.records import ROLES  # FastChat speaker -> chat role: records.py validates files, this scores them


def split_record(record: dict, where: str = "") -> tuple[list[dict], str]:
    """(chat messages up to the last assistant turn, that turn's reference answer) for one FastChat record.

    Args:
        record: {"conversations": [{"from", "value"}, ...]} with a question and ending with the "gpt" answer.
        where: names the record in a ValueError, e.g. "data/eval.jsonl:7" (lorakit.data.load_records_with_locations
            gives one per record); default: the record's id.
    """
    name = where or f"record {record.get('id', '?') if isinstance(record, dict) else record!r:.80}"
    try:
        turns = record["conversations"]
        messages = [{"role": ROLES[turn["from"]], "content": turn["value"]} for turn in turns]
    except (KeyError, TypeError) as error:
        raise ValueError(f"{name} is not a FastChat conversation ({type(error).__name__}: {error}): expected "
                         f"{{\"conversations\": [{{\"from\": one of {sorted(ROLES)}, \"value\": text}}, ...]}}; "
                         "lorakit.data.load_records validates files with line numbers") from None
    if not messages or messages[-1]["role"] != "assistant":
        last = f"last turn from {turns[-1]['from']!r}" if messages else "no turns"
        raise ValueError(f"{name} does not end with a 'gpt' turn to score against ({last}); end each evaluation record "
                         "with its \"gpt\" answer, or drop the trailing turn")
    if not any(m["role"] == "user" for m in messages[:-1]):
        raise ValueError(f"{name} has no \"human\" question before its 'gpt' answer, so there is no prompt to "
                         "generate from; add the question or drop the record")
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
        records: FastChat records, each ending with its "gpt" reference answer.
        locations: optional "file:line" per record (lorakit.data.load_records_with_locations), for error messages.
    """
    if not records:
        raise ValueError("exact_match needs at least one record")
    rows = predictions(model, tokenizer, records, max_new_tokens, locations)
    return sum(ref.strip() == pred for _, ref, pred in rows) / len(rows)
