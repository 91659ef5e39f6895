"""lorakit-train as a user meets it: every mistake ends in one line and exit code 2, a killed run resumes to the same
adapter as an uninterrupted one (also under ZeRO-3 on two ranks), and nothing of the user's is ever touched."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from test_records import as_messages
from test_runs import tree_hash

from lorakit.launch import launch_env, torchrun_command
from lorakit.models import TASK_DIR, load_base
from lorakit.runs import STAMP
from lorakit.train import main, train

ROOT = Path(__file__).resolve().parent.parent
ZERO3 = str(ROOT / "lorakit" / "configs" / "zero3.json")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A slice of the task (each run takes a second or two) and one file per kind of bad input."""
    folder = tmp_path_factory.mktemp("cli")
    task = {name: (TASK_DIR / f"{name}.jsonl").read_text().splitlines(keepends=True) for name in ("train", "eval")}
    (folder / "train.jsonl").write_text("".join(task["train"][:32]))
    (folder / "eval.jsonl").write_text("".join(task["eval"][:8]))
    (folder / "broken.jsonl").write_text(task["train"][0] + '{"conversations": [\n')
    (folder / "human_last.jsonl").write_text(json.dumps({"conversations": [{"from": "human", "value": "hi"}]}) + "\n")
    (folder / "emoji.jsonl").write_text(task["train"][0] + json.dumps({"conversations": [
        {"from": "human", "value": "reverse: abc"}, {"from": "gpt", "value": "\U0001f600\U0001f600\U0001f600"}]}) + "\n")
    for name, lines in (("train", task["train"][:32]), ("eval", task["eval"][:8])):  # the slice, "messages" shape
        (folder / f"{name}_messages.jsonl").write_text("".join(json.dumps(as_messages(json.loads(x))) + "\n"
                                                               for x in lines))
    in_messages = [json.dumps(as_messages(json.loads(line))) + "\n" for line in task["train"][:2]]
    (folder / "messages_bad.jsonl").write_text(in_messages[0] + json.dumps(
        {"messages": [{"role": "human", "content": "reverse: ab"}, {"role": "assistant", "content": "ba"}]}) + "\n")
    (folder / "mixed.jsonl").write_text(task["train"][0] + in_messages[1])
    (folder / "bad_ds.json").write_text('{\n  "zero_optimization": {"stage": 3},\n  "train_batch_size" 8\n}\n')
    (folder / "config_only").mkdir()
    shutil.copy(ROOT / "data" / "tiny" / "config.json", folder / "config_only")
    (folder / "no_weights").mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(ROOT / "data" / "tiny" / name, folder / "no_weights")
    (folder / "half_adapter").mkdir()
    (folder / "half_adapter" / "adapter_config.json").write_text('{"r": 8}')
    return folder


def quick(files: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["--output_dir", str(output_dir), "--data_path", str(files / "train.jsonl"),
            "--eval_data_path", str(files / "eval.jsonl"), "--per_device_train_batch_size", "8", "--max_steps", "4",
            "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1", "--disable_tqdm", "True",
            "--seed", "3", *extra]


# (flags added to a quick run, a fragment the one error line must contain); {f} is the folder of bad files
BAD_INPUTS = [
    (["--bogus", "3"], "unrecognized arguments: ['--bogus', '3']; see lorakit-train --help"),
    (["--lora_alpha", "nan"], "--lora_alpha"),
    (["--lora_r", "0"], "--lora_r 0 must be a positive integer"),
    (["--lora_dropout", "1.5"], "--lora_dropout 1.5 must be in [0, 1)"),
    (["--lora_bias", "some"], "--lora_bias 'some' is not one of none, all, lora_only"),
    (["--learning_rate", "-1"], "--learning_rate -1.0 must be > 0"),
    (["--num_train_epochs", "0", "--max_steps", "-1"], "--num_train_epochs 0 trains no step"),
    (["--model_max_length", "1"], "--model_max_length 1 is too small"),
    (["--data_path", "{f}/missing.jsonl"], "missing.jsonl: no such file"),
    (["--data_path", "{f}/train.csv"], "is neither .jsonl nor .json"),
    (["--data_path", "{f}/broken.jsonl"], "broken.jsonl:2:"),
    (["--eval_data_path", "{f}/human_last.jsonl"], "human_last.jsonl:1"),
    (["--data_path", "{f}/emoji.jsonl"], "emoji.jsonl:2: 100% of a reply's tokens are the unknown token"),
    (["--data_path", "{f}/messages_bad.jsonl"], "messages_bad.jsonl:2: message 0 has unknown role \"role\": 'human'; "
                                                "use one of ['assistant', 'system', 'user']"),
    (["--data_path", "{f}/mixed.jsonl"], "mixed.jsonl:2: this record is in the \"messages\" shape but the file's first "
                                         "record ({f}/mixed.jsonl:1) is in the ShareGPT shape"),
    (["--model_max_length", "8"], "none of its 32 records has a reply token left after truncation"),
    (["--model_name_or_path", "llama"], "'llama' is not a directory and not a known name (tiny, smollm2)"),
    (["--model_name_or_path", "{f}/config_only"], "no usable tokenizer"),
    (["--model_name_or_path", "{f}/no_weights"], "no file named model.safetensors"),
    (["--lora_weight_path", "{f}"], "holds no adapter_config.json"),
    (["--lora_weight_path", "{f}/half_adapter"], "has adapter_config.json but no adapter_model.safetensors"),
    (["--lora_target_modules", "q_proj", "q_projj"], "--lora_target_modules 'q_projj' matches no module"),
    (["--lora_target_modules", "mlp"], "'mlp' names a LlamaMLP, not a linear layer"),
    (["--deepspeed", "{f}/missing.json"], "--deepspeed {f}/missing.json: no such file"),
    (["--deepspeed", "{f}/bad_ds.json"], "bad_ds.json:3: not valid JSON"),
]


@pytest.mark.parametrize("flags, fragment", BAD_INPUTS, ids=[" ".join(f)[:40] for f, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(files, tmp_path, capsys, flags, fragment):
    flags = [flag.replace("{f}", str(files)) for flag in flags]
    assert main(quick(files, tmp_path / "run", *flags)) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorakit-train: error: "), err
    assert fragment.replace("{f}", str(files)) in lines[0], lines[0]
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_debug_variable_shows_the_traceback(files, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_DEBUG", "1")
    with pytest.raises(ValueError, match="--lora_r 0"):
        main(quick(files, tmp_path, "--lora_r", "0"))


def cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorakit.train", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or launch_env())


@pytest.mark.parametrize("flags, fragment", [
    (["--bogus", "3"], "unrecognized arguments"),
    (["--data_path", "{f}/broken.jsonl"], "broken.jsonl:2:"),
    (["--deepspeed", "{f}/bad_ds.json"], "bad_ds.json:3: not valid JSON"),
])
def test_console_script_prints_one_line(files, tmp_path, flags, fragment):
    result = cli(*quick(files, tmp_path / "run", *[f.replace("{f}", str(files)) for f in flags]))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and fragment in result.stderr


def test_port_in_use_names_the_variable(files, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = {k: v for k, v in launch_env().items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
        result = cli(*quick(files, tmp_path / "run", "--deepspeed", ZERO3),
                     env={**env, "LORAKIT_MASTER_PORT": str(busy.getsockname()[1])})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is in use" in result.stderr and "LORAKIT_MASTER_PORT" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("config, said", [
    ("zero2.json", None),  # FastChat's documented QLoRA command line uses ZeRO-2
    ("zero3.json", "QLoRA under ZeRO-3: 4-bit codes stored as torch.float32 (bnb_4bit_quant_storage)"),
])
def test_qlora_on_two_zero_ranks_saves_an_adapter_stock_peft_reloads(files, tmp_path, config, said):
    out = tmp_path / "run"
    command = torchrun_command(["-m", "lorakit.train", *quick(files, out, "--q_lora", "True", "--max_steps", "3",
                                                              "--per_device_train_batch_size", "4",
                                                              "--deepspeed", str(ROOT / "lorakit" / "configs" / config))])
    result = subprocess.run(command, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert said is None or said in result.stdout
    from lorakit.quant import load_in_4bit

    base = load_in_4bit(ROOT / "data" / "tiny")  # this process never trained: a fresh reload
    reloaded = PeftModel.from_pretrained(base, str(out))
    lora_b = [p for n, p in reloaded.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 4 and all(p.abs().max() > 0 for p in lora_b)


def test_no_library_noise_on_a_plain_run(files, tmp_path):
    result = cli(*quick(files, tmp_path / "run", "--bf16", "True"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Setting accelerator to CPU" not in result.stdout + result.stderr
    assert "gemm_4bit_forward" not in result.stdout + result.stderr
    assert "--bf16 True needs a CUDA GPU" in result.stdout  # the promised one-line fall-back


@pytest.fixture(scope="module")
def straight(files, tmp_path_factory) -> Path:
    """An uninterrupted run: 4 steps, checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train(quick(files, out))
    return out


def max_diff(a_dir: Path, b_dir: Path) -> float:
    a, b = load_file(str(a_dir / "adapter_model.safetensors")), load_file(str(b_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_resume_skips_a_damaged_checkpoint_whichever_file_is_cut(files, straight, tmp_path):
    names = sorted(str(p.relative_to(straight / "checkpoint-4")) for p in (straight / "checkpoint-4").rglob("*")
                   if p.is_file() and p.name != STAMP)
    assert {"adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= set(names)
    for name in names:
        crashed = tmp_path / name.replace("/", "_")
        shutil.copytree(straight, crashed)
        (crashed / "adapter_model.safetensors").unlink()  # the final save never happened
        victim = crashed / "checkpoint-4" / name
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
        train(quick(files, crashed))
        assert max_diff(straight, crashed) == 0.0, name
    reloaded = PeftModel.from_pretrained(load_base("tiny")[0], str(crashed))  # stock peft reads the resumed adapter
    assert any(p.abs().max() > 0 for n, p in reloaded.named_parameters() if "lora_B" in n)


def test_sigkill_during_a_save_then_resume_equals_uninterrupted(files, straight, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "lorakit.train", *quick(files, out, "--save_steps", "1")]
    process = subprocess.Popen(command, env=launch_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (out / "checkpoint-3").is_dir() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    os.kill(process.pid, signal.SIGKILL)  # as soon as checkpoint-3 appears: usually while it is being written
    process.wait()
    assert not (out / "adapter_model.safetensors").exists(), "the run finished before it could be killed"
    result = cli(*quick(files, out, "--save_steps", "1"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming from" in result.stdout
    assert max_diff(straight, out) == 0.0


def test_finished_run_with_the_same_flags_trains_nothing_and_says_so(files, straight, capsys):
    before = load_file(str(straight / "adapter_model.safetensors"))
    assert main(quick(files, straight)) == 0
    assert "the run had finished: nothing left to train" in capsys.readouterr().out
    after = load_file(str(straight / "adapter_model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_other_flags_into_a_finished_run_are_refused_and_change_nothing(files, straight, capsys):
    before = tree_hash(straight)
    assert main(quick(files, straight, "--learning_rate", "1e-3", "--lora_r", "4")) == 2
    err = capsys.readouterr().err
    assert "--learning_rate 0.003 → 0.001" in err and "--lora_r 8 → 4" in err and "--overwrite_output_dir" in err
    assert tree_hash(straight) == before


def test_foreign_output_dir_is_refused_then_overwrite_keeps_the_users_files(files, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "checkpoint-final").mkdir(parents=True)
    (out / "checkpoint-final" / "weights.bin").write_bytes(b"precious")
    (out / "checkpoint-1").mkdir()
    (out / "checkpoint-1" / "notes.txt").write_text("mine too")
    (out / "notes.txt").write_text("do not touch")
    before = tree_hash(out)
    assert main(quick(files, out)) == 2
    assert "is not a lorakit-train run" in capsys.readouterr().err and tree_hash(out) == before
    assert main(quick(files, out, "--overwrite_output_dir", "True", "--save_total_limit", "1")) == 0
    assert (out / "checkpoint-final" / "weights.bin").read_bytes() == b"precious"  # rotation spared what it did not
    assert (out / "checkpoint-1" / "notes.txt").read_text() == "mine too"  # write
    assert (out / "notes.txt").read_text() == "do not touch"
    assert not (out / "checkpoint-2").exists() and (out / "checkpoint-4" / STAMP).is_file()


def test_lora_weight_path_conflict_is_refused_and_its_shape_is_printed(files, straight, tmp_path, capsys):
    assert main(quick(files, tmp_path / "a", "--lora_weight_path", str(straight), "--lora_r", "16")) == 2
    assert "--lora_r 16 (the adapter has 8)" in capsys.readouterr().err
    assert main(quick(files, tmp_path / "b", "--lora_weight_path", str(straight), "--max_steps", "1")) == 0
    assert "continuing the adapter in" in capsys.readouterr().out


def test_eval_path_comes_from_the_parsed_flags(files, tmp_path, capsys):
    assert main(quick(files, tmp_path / "a", "--eval-data-path", str(files / "eval.jsonl"), "--max_steps", "1")) == 0
    assert f"({files / 'eval.jsonl'})" in capsys.readouterr().out
    assert main(quick(files, tmp_path / "b", "--eval_data_path", "", "--max_steps", "1")) == 0
    assert "held-out exact match" not in capsys.readouterr().out


def test_messages_shape_trains_the_same_adapter_and_scores_its_eval_file(files, straight, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(quick(files, out, "--data_path", str(files / "train_messages.jsonl"),
                      "--eval_data_path", str(files / "eval_messages.jsonl"))) == 0
    assert f"held-out exact match: 0.0% ({files / 'eval_messages.jsonl'})" in capsys.readouterr().out
    assert max_diff(straight, out) == 0.0  # the same conversations in the other shape: same tokens, steps, adapter


@pytest.mark.slow
def test_zero3_two_ranks_killed_rank_resumes_to_the_same_adapter(files, tmp_path):
    """Two CPU ranks under ZeRO-3 with gradient checkpointing: one rank is SIGKILLed mid-run, the relaunch resumes
    from the newest complete checkpoint, and the adapter equals the uninterrupted two-rank run's exactly. Checkpointing
    runs in its reentrant form, the one that survives ZeRO-3's re-partitioned frozen weights."""
    def launch(out: Path, output=subprocess.PIPE) -> subprocess.Popen:
        command = torchrun_command(["-m", "lorakit.train", *quick(files, out, "--max_steps", "6",
                                                                  "--per_device_train_batch_size", "4",
                                                                  "--gradient_checkpointing", "True",
                                                                  "--deepspeed", ZERO3)], nproc=2)
        return subprocess.Popen(command, env=launch_env(), stdout=output, stderr=subprocess.STDOUT, text=True)

    straight = launch(tmp_path / "straight")
    output = straight.communicate(timeout=600)[0]
    assert straight.returncode == 0, output[-3000:]
    assert "gradient checkpointing under ZeRO-3 with frozen base weights: use_reentrant=True" in output
    killed = launch(tmp_path / "killed", output=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (tmp_path / "killed" / "checkpoint-4").is_dir() and time.monotonic() < deadline:
        time.sleep(0.005)
    ranks = subprocess.run(["pgrep", "-P", str(killed.pid)], capture_output=True, text=True).stdout.split()
    os.kill(int(ranks[-1]), signal.SIGKILL)  # one rank dies; torchrun then stops the other
    assert killed.wait(timeout=300) != 0
    assert not (tmp_path / "killed" / "adapter_model.safetensors").exists()
    relaunched = launch(tmp_path / "killed")
    output = relaunched.communicate(timeout=600)[0]
    assert relaunched.returncode == 0, output[-3000:]
    assert "resuming from" in output
    assert max_diff(tmp_path / "straight", tmp_path / "killed") == 0.0


def test_data_problems_that_do_not_stop_the_run_are_printed(files, tmp_path, capsys):
    records = (files / "train.jsonl").read_text().splitlines(keepends=True)
    odd = {"conversations": [{"from": "human", "value": "reverse: abcdef"}, {"from": "gpt", "value": "fedcb\u00e9"}]}
    (tmp_path / "odd.jsonl").write_text("".join(records[:8]) + json.dumps(odd) + "\n")
    assert main(quick(files, tmp_path / "run", "--data_path", str(tmp_path / "odd.jsonl"), "--max_steps", "1",
                      "--model_max_length", "24")) == 0
    out = capsys.readouterr().out
    assert "1 of 9 records have replies the tokenizer cannot spell (first: " in out and "odd.jsonl:9" in out
    assert "were truncated" in out
