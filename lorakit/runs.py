"""A run directory that never loses work: a marked owner, settings checked on resume, checkpoints trusted once complete.

    from lorakit.runs import open_run, RunCallback
    run = open_run("runs/x", settings={"--learning_rate": 3e-3, ...}, overwrite=False)   # refuses a foreign dir
    trainer.add_callback(RunCallback(run, keep=2))      # stamps each checkpoint-N once complete; rotates only its own
    trainer.train(resume_from_checkpoint=run.resume_from)                                # None, or a verified one

What transformers alone does with an output directory (5.24, measured): `save_total_limit` deletes every folder named
`checkpoint-*` there, whoever made it; `get_last_checkpoint` returns the highest-numbered folder even when a kill left
it half-written, and resuming from it fails; resuming into a finished run with new flags trains 0 steps and hands back
the old adapter. Here instead:

- The directory is marked: `lorakit-run.json` records the run's id and the settings that decide its result. A
  non-empty directory without the mark is refused (`overwrite=True` allows writing there; nothing is ever deleted
  that this run did not write). A marked one is resumed only when the settings match; otherwise the differing flags
  are named.
- A checkpoint counts once complete: after transformers has written `checkpoint-N/` (every rank), the callback writes
  `checkpoint-N/lorakit-checkpoint.json` listing each file with its size and SHA-256, atomically (write, then rename).
  transformers offers no hook to write a checkpoint under a temporary name and rename it, so the stamp is what makes
  it visible. Resume takes the newest checkpoint whose stamp carries this run's id and whose files are exactly the
  listed ones, byte for byte; every newer one skipped is reported with the reason.
- That check is also the pickle guard: DeepSpeed loads `global_step*/*.pt` with `torch.load(weights_only=False)`,
  which runs code hidden in the file. Only files this run wrote (same hash, nothing added) are ever resumed from.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback

MARKER = "lorakit-run.json"
STAMP = "lorakit-checkpoint.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class RunDirError(ValueError):
    """The output directory cannot be used as asked; the message names the problem and the ways out."""


@dataclass
class Run:
    """An output directory opened for training: its id, and the verified checkpoint to resume from (or None)."""

    output_dir: Path
    run_id: str
    settings: dict
    resume_from: str | None = None
    skipped: list[str] = field(default_factory=list)  # "checkpoint-N: reason" for each newer checkpoint not trusted
    finished_step: int | None = None  # set when the marked run had already saved its final adapter


def _json_ready(settings: dict) -> dict:
    return json.loads(json.dumps(settings, default=str))  # what the marker stores, so comparisons see the same types


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> dict[str, dict]:
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != STAMP}


def _write_json(path: Path, data: dict) -> None:
    """Write atomically: a reader (or a kill) sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def settings_diff(saved: dict, now: dict) -> list[str]:
    """'--flag saved → now' for every setting that differs (missing on one side counts)."""
    now = _json_ready(now)
    return [f"{key} {saved.get(key, '(unset)')!r} → {now.get(key, '(unset)')!r}"
            for key in sorted(set(saved) | set(now)) if saved.get(key) != now.get(key)]


def open_run(output_dir: str | os.PathLike, settings: dict, overwrite: bool = False) -> Run:
    """Decide what this run may do in `output_dir`, and mark it as ours; call on one process only (rank 0).

    Args:
        output_dir: the run directory (created if missing).
        settings: flag → value for everything that decides the trained result (data hash, lr, seed, LoRA shape, ...).
        overwrite: start a fresh run in a directory that holds other files or another run; nothing is deleted.
    Raises:
        RunDirError: a non-empty directory that is not a lorakit run, or a lorakit run with other settings.
    """
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise RunDirError(f"--output_dir {folder} is a file, not a directory; pass a new directory name")
    marker = folder / MARKER
    saved = json.loads(marker.read_text()) if marker.is_file() else None
    contents = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if not overwrite and saved is None and contents:
        shown = ", ".join(contents[:4]) + (", ..." if len(contents) > 4 else "")
        raise RunDirError(f"--output_dir {folder} is not empty ({shown}) and is not a lorakit-train run; use a new or "
                          "empty directory, or --overwrite_output_dir True to write there anyway (nothing is deleted)")
    if not overwrite and saved is not None:
        differences = settings_diff(saved.get("settings", {}), settings)
        if differences:
            raise RunDirError(f"--output_dir {folder} holds a run with other settings ({'; '.join(differences)}); "
                              "resuming needs the same ones: use a new --output_dir, or --overwrite_output_dir True "
                              "to start a fresh run there")
        run = Run(folder, saved["run_id"], saved["settings"], finished_step=saved.get("finished_step"))
        run.resume_from, run.skipped = newest_complete_checkpoint(folder, run.run_id)
        return run
    folder.mkdir(parents=True, exist_ok=True)
    run = Run(folder, uuid.uuid4().hex, _json_ready(settings))
    _write_json(marker, {"tool": "lorakit-train", "run_id": run.run_id, "settings": run.settings})
    return run


def mark_finished(run: Run, step: int) -> None:
    """Record in the marker that the final adapter of this run was saved at `step` (rank 0)."""
    marker = run.output_dir / MARKER
    _write_json(marker, {**json.loads(marker.read_text()), "finished_step": step})


def checkpoint_problem(folder: Path, run_id: str) -> str | None:
    """Why `folder` cannot be resumed from (None when it is complete, ours, and unchanged)."""
    stamp = folder / STAMP
    if not stamp.is_file():
        return "incomplete (no completion stamp: the run stopped while writing it)"
    try:
        recorded = json.loads(stamp.read_text())
    except json.JSONDecodeError:
        return "its completion stamp is damaged"
    if recorded.get("run_id") != run_id:
        return "written by another run"
    found = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != STAMP}
    listed = recorded.get("files", {})
    if found - set(listed):
        return f"holds files this run did not write ({', '.join(sorted(found - set(listed))[:3])})"
    for name, expected in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {expected['bytes']} were written"
        if sha256(path) != expected["sha256"]:
            return f"{name} changed since it was written"
    return None


def checkpoints(folder: Path) -> list[Path]:
    """checkpoint-N folders, newest (highest N) first."""
    found = [p for p in folder.iterdir() if p.is_dir() and CHECKPOINT.match(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(CHECKPOINT.match(p.name).group(1)), reverse=True)


def newest_complete_checkpoint(folder: Path, run_id: str) -> tuple[str | None, list[str]]:
    """(path of the newest trustworthy checkpoint or None, ["checkpoint-N: reason" for each newer one skipped])."""
    skipped = []
    for candidate in checkpoints(folder):
        problem = checkpoint_problem(candidate, run_id)
        if problem is None:
            return str(candidate), skipped
        skipped.append(f"{candidate.name}: {problem}")
    return None, skipped


def stamp_checkpoint(folder: Path, run_id: str) -> None:
    """Declare `folder` complete: list every file with its size and hash, atomically."""
    _write_json(folder / STAMP, {"run_id": run_id, "files": _files(folder)})


def rotate(run: Run, keep: int | None) -> list[Path]:
    """Delete this run's complete checkpoints beyond the newest `keep`; never a folder another run or a person made."""
    if not keep or keep <= 0:
        return []
    ours = [p for p in checkpoints(run.output_dir) if checkpoint_problem(p, run.run_id) is None]
    for old in ours[keep:]:
        shutil.rmtree(old)
    return ours[keep:]


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class RunCallback(TrainerCallback):
    """Stamps each checkpoint once every rank has written it, then rotates this run's own checkpoints.

    Use it with the Trainer's own rotation off (`args.save_total_limit = None`), since that deletes any `checkpoint-*`.
    """

    def __init__(self, run: Run, keep: int | None):
        self.run, self.keep = run, keep

    def on_save(self, args, state, control, **kwargs):
        _barrier()  # every rank has finished writing its part of checkpoint-N
        if args.process_index == 0:
            stamp_checkpoint(self.run.output_dir / f"checkpoint-{state.global_step}", self.run.run_id)
            rotate(self.run, self.keep)
        _barrier()
        return control
