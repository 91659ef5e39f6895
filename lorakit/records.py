"""Conversation records in either chat shape: read .jsonl / .json files and validate every record.

    from lorakit.records import DataError, check_record, load_records
    records = load_records("data/task/train.jsonl")   # validated; a DataError names file:line and the fix
    messages = check_record(records[0], "data/task/train.jsonl:1")   # [{"role": "user", ...}, ...] for a template

A record, one per line in .jsonl or a list in .json, has one of two shapes, the same in a whole file (the first record
decides). ShareGPT / FastChat, where "human" (or "user") asks and "gpt" (or "assistant") answers:
    {"id": "reverse-0", "conversations": [{"from": "human", "value": "reverse: dac"}, {"from": "gpt", "value": "cad"}]}
and "messages", the shape of TRL, OpenAI fine-tuning files and Hugging Face chat datasets:
    {"messages": [{"role": "user", "content": "reverse: dac"}, {"role": "assistant", "content": "cad"}]}

A system prompt is a first {"role": "system"} message, or in ShareGPT a first {"from": "system"} turn or a
record-level "system" string ("" means none); it is prompt, never learned. After it the turns alternate, question
first. An assistant message may carry OpenAI's "weight": 0 (keep the reply as context, do not learn it) or 1.
check_record turns either shape into the same chat messages, so tokenisation, masking and scoring never see the
difference. Every problem is a DataError (a ValueError) that names the file and line (or record index) and the fix,
never a KeyError deep inside tokenisation. lorakit.data tokenises the messages; lorakit.evaluate scores them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MESSAGE_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}
EXAMPLE = '{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}'
MESSAGES_EXAMPLE = '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'
ROLE_HINTS = {"developer": '; "developer" is OpenAI\'s newer name for "system": rename it',
              "tool": "; tool calls are not supported: drop the records that use them",
              "function": "; function calls are not supported: drop the records that use them"}


@dataclass(frozen=True)
class Shape:
    """One record shape and the words its DataErrors use: `turn 2 has unknown role "from"`, `message 2 ...`."""

    key: str  # the record's list of turns
    speaker: str  # a turn's role key
    text: str  # a turn's text key
    user: str  # the asking role, as this shape spells it
    assistant: str  # the answering role
    item: str  # what this shape calls one turn
    roles: dict  # the role names it accepts -> chat role
    example: str
    label: str  # the shape in a sentence


SHAREGPT = Shape("conversations", "from", "value", "human", "gpt", "turn", ROLES, EXAMPLE,
                 'the ShareGPT shape ("conversations")')
MESSAGES = Shape("messages", "role", "content", "user", "assistant", "message", MESSAGE_ROLES, MESSAGES_EXAMPLE,
                 'the "messages" shape')


class DataError(ValueError):
    """A data file or record that cannot be used; the message names file:line (or record index) and the fix."""


def record_shape(record: object, where: str) -> Shape:
    """SHAREGPT or MESSAGES, from the record's keys; DataError for a non-object or a record with neither or both."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object like {EXAMPLE} or {MESSAGES_EXAMPLE}, got "
                        f"{type(record).__name__}")
    found = [shape for shape in (SHAREGPT, MESSAGES) if shape.key in record]
    if not found:
        raise DataError(f"{where}: missing key \"conversations\" or \"messages\" (keys: {sorted(record)}); each record "
                        f"needs {EXAMPLE} or {MESSAGES_EXAMPLE}")
    if len(found) == 2:
        raise DataError(f"{where}: the record has both \"conversations\" and \"messages\"; keep the one that holds the "
                        "conversation and drop the other")
    return found[0]


def _message(turn: object, i: int, s: Shape, where: str) -> dict:
    """One turn of shape s as a chat message {"role", "content"} (+ "weight": 0 for a reply not to learn)."""
    if not isinstance(turn, dict) or s.speaker not in turn or s.text not in turn:
        other = MESSAGES if s is SHAREGPT else SHAREGPT
        hint = (f"; it looks like {other.label}: rename \"{s.key}\" to \"{other.key}\"" if isinstance(turn, dict)
                and other.speaker in turn and other.text in turn else "")
        raise DataError(f"{where}: {s.item} {i} must be an object with \"{s.speaker}\" and \"{s.text}\", got "
                        f"{turn!r:.80}{hint}")
    who, text = turn[s.speaker], turn[s.text]
    role = s.roles.get(who) if isinstance(who, str) else None
    if role is None:
        hint = ROLE_HINTS.get(who, "") if isinstance(who, str) else ""
        raise DataError(f"{where}: {s.item} {i} has unknown role \"{s.speaker}\": {who!r}; use one of "
                        f"{sorted(s.roles)} (\"{s.user}\" asks, \"{s.assistant}\" answers){hint}")
    if not isinstance(text, str):
        raise DataError(f"{where}: {s.item} {i} ({who}) has a {type(text).__name__} \"{s.text}\", not text; lorakit "
                        "trains on plain text (no content parts or tool calls): give it one string or drop the record")
    if not text.strip():
        raise DataError(f"{where}: {s.item} {i} ({who}) has an empty \"{s.text}\"; give it text or drop the {s.item} "
                        "(and its reply)")
    message = {"role": role, "content": text}
    weight = turn.get("weight")  # OpenAI's per-reply switch (ShareGPT has none); null: absent, as table exports write
    if weight is not None and s is MESSAGES:
        if role != "assistant" or type(weight) is not int or weight not in (0, 1):
            raise DataError(f"{where}: message {i} ({who}) has \"weight\": {weight!r}; only assistant messages take "
                            "one, 0 (keep the reply as context, do not learn it) or 1 (learn it, the default)")
        message.update({"weight": 0} if weight == 0 else {})
    return message


def check_record(record: object, where: str, for_eval: bool = False) -> list[dict]:
    """Validate one record of either shape and return its turns as chat messages [{"role", "content"}]; DataError
    otherwise. Both shapes of one conversation give equal messages: the rest of lorakit sees only these.

    Args: where names the record in errors ("data/train.jsonl:7"); for_eval also requires the last turn to be the
    assistant's answer, which exact match scores the reply to everything before it against.
    """
    s = record_shape(record, where)
    turns = record[s.key]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: \"{s.key}\" must be a non-empty list of {s.item}s like {s.example}")
    messages = [_message(turn, i, s, where) for i, turn in enumerate(turns)]
    system, offset = record.get("system"), 0  # offset: messages[i] is turn i - offset
    if system is not None and not isinstance(system, str):
        raise DataError(f"{where}: \"system\" must be a string (the system prompt), got {type(system).__name__}; give "
                        "it text or drop the key")
    if system and system.strip():  # "" is no system prompt: table exports carry the column in every record
        if s is MESSAGES:
            raise DataError(f"{where}: a record-level \"system\" is the ShareGPT way; in a \"messages\" record the "
                            "system prompt is the first message, {\"role\": \"system\", \"content\": ...}: move it "
                            "there")
        if messages[0]["role"] == "system":
            raise DataError(f"{where}: two system prompts, the record's \"system\" and turn 0; keep one")
        messages, offset = [{"role": "system", "content": system}, *messages], 1
    start = 1 if messages[0]["role"] == "system" else 0
    dialogue = messages[start:]
    if not dialogue or dialogue[0]["role"] != "user":
        got = repr(turns[start - offset][s.speaker]) if dialogue else "nothing"
        raise DataError(f"{where}: the first {s.item} (after an optional system {s.item}) must be from \"{s.user}\", "
                        f"got {got}; drop the leading reply or add the question it answers")
    for i, message in enumerate(dialogue):
        if message["role"] == "system":
            raise DataError(f"{where}: {s.item} {i + start - offset} is a system {s.item}, but only the first "
                            f"{s.item} may be; move its text into the system prompt at the start")
        if message["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise DataError(f"{where}: {s.item}s must alternate {s.user}, {s.assistant}, {s.user}, ...; {s.item} "
                            f"{i + start - offset} breaks it; merge consecutive {s.item}s of one speaker")
    if len(dialogue) < 2:
        raise DataError(f"{where}: no \"{s.assistant}\" reply to learn from; add the answer {s.item} or drop the "
                        "record")
    if for_eval and dialogue[-1]["role"] != "assistant":
        raise DataError(f"{where}: an evaluation record must end with its \"{s.assistant}\" answer (exact match scores "
                        f"the reply to everything before it), but its last {s.item} is from \"{s.user}\"; add the "
                        f"answer or drop the trailing {s.item}")
    return messages


def load_records(path: str | Path, for_eval: bool = False) -> list[dict]:
    """Read and validate conversation records from .jsonl (one per line, blank lines allowed) or .json (a list).

    Raises DataError naming path:line (.jsonl) or path record N (.json) and what to do for any problem, a file that
    mixes the two shapes included; with for_eval (a file scored by exact match) also for a record that does not end
    with its answer. The records come back as written; check_record turns one into chat messages.
    """
    return load_records_with_locations(path, for_eval)[0]


def _jsonl(path: Path, text: str):
    """(record, "path:line") for each non-blank line, parsed as it is reached so errors come in file order."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: not JSON ({error.msg} at column {error.colno}); each line must be one "
                            f"record like {EXAMPLE} or {MESSAGES_EXAMPLE}") from None
        yield record, f"{path}:{number}"


def load_records_with_locations(path: str | Path, for_eval: bool = False) -> tuple[list[dict], list[str]]:
    """(records, where each is: "path:line" for .jsonl, "path record N" for .json), validated as by load_records.

    Later checks (tokenisation, data_report) name a record's line from these: blank lines make its index no guide.
    """
    path = Path(path)
    if path.suffix not in (".json", ".jsonl"):
        raise DataError(f"{path}: unknown data format {path.suffix!r}; use .jsonl (one record per line) or .json "
                        "(a list of records); convert Parquet with the datasets library, "
                        "Dataset.from_parquet(path).to_json(\"train.jsonl\") (Arrow: Dataset.from_file(path))")
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass --data_path to a .jsonl or .json file of conversation records")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); re-save it as UTF-8") from None
    if path.suffix == ".jsonl":
        items = _jsonl(path, text)
    else:
        try:
            data = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{error.lineno}: not JSON ({error.msg} at column {error.colno}); a .json file "
                            f"must hold a list of records like [{EXAMPLE}]") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json data file must hold a list of records, got {type(data).__name__}; "
                            "wrap the records in [ ... ] or use .jsonl")
        items = ((record, f"{path} record {index}") for index, record in enumerate(data))
    records: list[dict] = []
    locations: list[str] = []
    first: tuple[Shape, str] | None = None  # the file's shape and the record that set it
    for record, where in items:
        shape = record_shape(record, where)
        first = first or (shape, where)
        if shape is not first[0]:
            raise DataError(f"{where}: this record is in {shape.label} but the file's first record ({first[1]}) is "
                            f"in {first[0].label}, and a file holds one shape; write it as {first[0].example} or "
                            "keep the two shapes in separate files")
        check_record(record, where, for_eval)
        records.append(record)
        locations.append(where)
    if not records:
        raise DataError(f"{path}: no records; the file is empty. Add records like {EXAMPLE} or {MESSAGES_EXAMPLE}")
    return records, locations
