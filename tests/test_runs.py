"""lorakit.runs: which output directories a run may use, which checkpoints it trusts, and what rotation may delete."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from lorakit.runs import (
    MARKER,
    STAMP,
    RunDirError,
    checkpoint_problem,
    mark_finished,
    open_run,
    rotate,
    stamp_checkpoint,
)

SETTINGS = {"--learning_rate": 3e-3, "--seed": 0, "--lora_target_modules": ["q_proj", "v_proj"]}


def tree_hash(folder: Path) -> str:
    """One hash over every path and byte under `folder`: equal before and after means nothing was touched."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def fake_checkpoint(run_dir: Path, step: int, run_id: str | None) -> Path:
    folder = run_dir / f"checkpoint-{step}"
    (folder / "global_step2").mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(bytes(range(200)) * step)
    (folder / "global_step2" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 300)
    if run_id:
        stamp_checkpoint(folder, run_id)
    return folder


def test_new_directory_is_marked(tmp_path):
    run = open_run(tmp_path / "new", SETTINGS)
    marker = json.loads((tmp_path / "new" / MARKER).read_text())
    assert marker["run_id"] == run.run_id and marker["settings"]["--seed"] == 0 and run.resume_from is None


@pytest.mark.parametrize("contents", [["notes.txt"], ["checkpoint-final/"], ["README.md", "tokenizer.json"]])
def test_foreign_directory_is_refused_and_untouched(tmp_path, contents):
    for name in contents:
        (tmp_path / name.rstrip("/")).mkdir() if name.endswith("/") else (tmp_path / name).write_text("mine")
    before = tree_hash(tmp_path)
    with pytest.raises(RunDirError, match=r"is not empty .* not a lorakit-train run; use a new or empty directory, "
                                          r"or --overwrite_output_dir True"):
        open_run(tmp_path, SETTINGS)
    assert tree_hash(tmp_path) == before


@pytest.mark.parametrize("change, named", [
    ({"--learning_rate": 1e-3}, "--learning_rate 0.003 → 0.001"),
    ({"--seed": 7}, "--seed 0 → 7"),
    ({"--lora_target_modules": ["q_proj"]}, "--lora_target_modules ['q_proj', 'v_proj'] → ['q_proj']"),
    ({"data sha256": "abc"}, "data sha256 '(unset)' → 'abc'"),
])
def test_other_settings_are_refused_with_the_differing_flags(tmp_path, change, named):
    open_run(tmp_path, SETTINGS)
    with pytest.raises(RunDirError, match="holds a run with other settings") as error:
        open_run(tmp_path, {**SETTINGS, **change})
    assert named in str(error.value) and "use a new --output_dir, or --overwrite_output_dir True" in str(error.value)


def test_same_settings_resume_the_newest_complete_checkpoint(tmp_path):
    run = open_run(tmp_path, SETTINGS)
    fake_checkpoint(tmp_path, 2, run.run_id)
    fake_checkpoint(tmp_path, 10, run.run_id)
    fake_checkpoint(tmp_path, 12, None)  # a kill while writing it: no stamp
    again = open_run(tmp_path, SETTINGS)
    assert again.run_id == run.run_id and again.resume_from == str(tmp_path / "checkpoint-10")
    assert again.skipped == ["checkpoint-12: incomplete (no completion stamp: the run stopped while writing it)"]


def test_overwrite_starts_a_fresh_run_that_trusts_none_of_the_old_checkpoints(tmp_path):
    old = open_run(tmp_path, SETTINGS)
    fake_checkpoint(tmp_path, 2, old.run_id)
    fresh = open_run(tmp_path, {**SETTINGS, "--seed": 9}, overwrite=True)
    assert fresh.run_id != old.run_id and fresh.resume_from is None
    assert (tmp_path / "checkpoint-2" / STAMP).is_file()  # nothing deleted


@pytest.mark.parametrize("damage, reason", [
    (lambda c: (c / STAMP).unlink(), "incomplete"),
    (lambda c: (c / STAMP).write_text("{"), "completion stamp is damaged"),
    (lambda c: (c / "adapter_model.safetensors").write_bytes(b"short"), "has 5 bytes, 400 were written"),
    (lambda c: (c / "adapter_model.safetensors").write_bytes(bytes(400)), "changed since it was written"),
    (lambda c: (c / "global_step2" / "mp_rank_00_model_states.pt").unlink(), "is missing"),
    # a planted pickle that DeepSpeed would load with weights_only=False on resume
    (lambda c: (c / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"evil"),
     "holds files this run did not write"),
])
def test_checkpoint_problems_are_named(tmp_path, damage, reason):
    folder = fake_checkpoint(tmp_path, 2, "run-a")
    assert checkpoint_problem(folder, "run-a") is None
    damage(folder)
    assert reason in checkpoint_problem(folder, "run-a")


def test_a_checkpoint_of_another_run_is_not_trusted(tmp_path):
    assert checkpoint_problem(fake_checkpoint(tmp_path, 2, "run-a"), "run-b") == "written by another run"


def test_rotation_deletes_only_this_runs_complete_checkpoints(tmp_path):
    run = open_run(tmp_path, SETTINGS)
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, step, run.run_id)
    fake_checkpoint(tmp_path, 1, "someone-else")
    (tmp_path / "checkpoint-final").mkdir()
    fake_checkpoint(tmp_path, 3, None)
    deleted = rotate(run, keep=1)
    assert sorted(p.name for p in deleted) == ["checkpoint-2", "checkpoint-4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-3", "checkpoint-6",
                                                          "checkpoint-final", MARKER]


def test_finished_step_is_recorded(tmp_path):
    run = open_run(tmp_path, SETTINGS)
    mark_finished(run, 40)
    assert open_run(tmp_path, SETTINGS).finished_step == 40


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "x").write_text("")
    with pytest.raises(RunDirError, match="is a file, not a directory"):
        open_run(tmp_path / "x", SETTINGS)
