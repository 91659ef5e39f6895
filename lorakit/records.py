"""Conversation records (FastChat / ShareGPT style): read .jsonl / .json files and validate every record.

    from lorakit.records import DataError, load_records
    records = load_records("data/task/train.jsonl")   # validated; a DataError names file:line and the fix
    messages = check_record(records[0], "data/task/train.jsonl:1")   # [{"role": "user", ...}, ...] for a template

A record, one per line in .jsonl or a list in .json:
    {"id": "reverse-0", "conversations": [{"from": "human", "value": "reverse: dacz"}, {"from": "gpt", "value": "zcad"}]}

"human" (or "user") asks, "gpt" (or "assistant") answers, an optional first "system" turn sets the scene; turns
alternate. Every problem is a DataError (a ValueError) that names the file and line (or record index) and the fix,
never a KeyError deep inside tokenisation. lorakit.data tokenises the messages; lorakit.evaluate scores them.
"""

from __future__ import annotations

import json
from pathlib import Path

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
EXAMPLE = '{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}'


class DataError(ValueError):
    """A data file or record that cannot be used; the message names file:line (or record index) and the fix."""


def check_record(record: object, where: str, for_eval: bool = False) -> list[dict]:
    """Validate one record and return its turns as chat messages [{"role", "content"}]; DataError otherwise.

    Args: where names the record in errors ("data/train.jsonl:7"); for_eval also requires the last turn to be the
    "gpt" answer, which exact match scores the reply to everything before it against.
    """
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
    if for_eval and dialogue[-1]["role"] != "assistant":
        raise DataError(f"{where}: an evaluation record must end with its \"gpt\" answer (exact match scores the reply "
                        "to everything before it), but its last turn is from \"human\"; add the answer or drop the "
                        "trailing turn")
    return messages


def load_records(path: str | Path, for_eval: bool = False) -> list[dict]:
    """Read and validate FastChat records from .jsonl (one per line, blank lines allowed) or .json (a list).

    Raises DataError naming path:line (.jsonl) or path record N (.json) and what to do for any problem; with for_eval
    (a file scored by exact match) also for a record that does not end with its "gpt" answer.
    """
    return load_records_with_locations(path, for_eval)[0]


def load_records_with_locations(path: str | Path, for_eval: bool = False) -> tuple[list[dict], list[str]]:
    """(records, where each is: "path:line" for .jsonl, "path record N" for .json), validated as by load_records.

    Later checks (tokenisation, data_report) name a record's line from these: blank lines make its index no guide.
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
    locations: list[str] = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not JSON ({error.msg} at column {error.colno}); each line must be "
                                f"one record like {EXAMPLE}") from None
            check_record(record, f"{path}:{number}", for_eval)
            records.append(record)
            locations.append(f"{path}:{number}")
    else:
        try:
            data = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{error.lineno}: not JSON ({error.msg} at column {error.colno}); a .json file "
                            f"must hold a list of records like [{EXAMPLE}]") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json data file must hold a list of records, got {type(data).__name__}; "
                            "wrap the records in [ ... ] or use .jsonl")
        locations = [f"{path} record {index}" for index in range(len(data))]
        for record, where in zip(data, locations, strict=True):
            check_record(record, where, for_eval)
        records = data
    if not records:
        raise DataError(f"{path}: no records; the file is empty. Add records like {EXAMPLE}")
    return records, locations
