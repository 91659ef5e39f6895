"""lorakit.launch: free ports, the torchrun command, an environment whose warning filter hides only the measured library
noise (a user's own warnings still show), lorakit-train in a fresh process, and the deterministic lines of its log."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lorakit import launch


def test_free_port_can_be_bound():
    port = launch.free_port()
    assert 1024 <= port < 65536
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # nothing holds it after free_port returns


@pytest.mark.parametrize("module_args, nproc, port, tail", [
    (["-m", "lorakit.zero3_demo", "--out", "d"], 2, 29600,
     ["--nproc_per_node", "2", "--master_port", "29600", "-m", "lorakit.zero3_demo", "--out", "d"]),
    (["script.py"], 1, 12345, ["--nproc_per_node", "1", "--master_port", "12345", "script.py"]),
])
def test_torchrun_command(module_args, nproc, port, tail):
    assert launch.torchrun_command(module_args, nproc, port) == [sys.executable, "-m", "torch.distributed.run", *tail]


def test_torchrun_command_picks_a_port_and_refuses_zero_ranks():
    command = launch.torchrun_command(["x.py"], 2)
    assert int(command[command.index("--master_port") + 1]) > 0
    with pytest.raises(ValueError, match="nproc=0"):
        launch.torchrun_command(["x.py"], 0)


@pytest.mark.parametrize("base, warnings", [
    ({}, ",".join(launch.LIBRARY_NOISE)),
    ({"PYTHONWARNINGS": "error::UserWarning"}, "error::UserWarning," + ",".join(launch.LIBRARY_NOISE)),
])
def test_launch_env(base, warnings):
    env = launch.launch_env({**base, "TORCH_EXTENSIONS_DIR": "/cache", "OMP_NUM_THREADS": "8"})
    assert env["PYTHONWARNINGS"] == warnings  # the user's own setting first: the library entries win where they apply
    assert env["OMP_NUM_THREADS"] == "1" and env["TOKENIZERS_PARALLELISM"] == "false"
    assert env["TORCH_EXTENSIONS_DIR"] == "/cache"  # a cache the user chose is kept
    assert all(not entry.startswith("ignore::") or entry.count(":") == 3 for entry in launch.LIBRARY_NOISE)  # by module


# (the module a FutureWarning is attributed to, whether the launch environment shows it)
ATTRIBUTED = [
    ("torch.distributed.c10d_logger", False),  # DeepSpeed's deprecated collectives, every step on every rank
    ("transformers.modeling_utils", False),
    ("transformers.training_args", False),
    ("__main__", True),  # the user's own code
    ("transformers.trainer", True),  # other library modules: not measured as noise, so not hidden
]


@pytest.mark.parametrize("module, shown", ATTRIBUTED)
def test_launch_env_hides_only_the_measured_library_warnings(module, shown):
    script = f"import warnings; warnings.warn_explicit('marker', FutureWarning, 'f.py', 1, module={module!r})"
    env = launch.launch_env({"PATH": "/usr/bin:/bin"})
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert ("FutureWarning: marker" in result.stderr) == shown, result.stderr


@pytest.mark.parametrize("log, expected", [
    ("[lorakit-train] saved\n{'loss': 1.2}\n[lorakit-train] saved\n", ["[lorakit-train] saved"]),  # once each
    ("[rank0]: lorakit-train: error: bad\n[rank1]: lorakit-train: error: bad\n", ["lorakit-train: error: bad"]),
    ("trainable params: 7 || all params: 9\n 10%|#  | 1/10 [00:01<00:09]\n", ["trainable params: 7 || all params: 9"]),
    ("[lorakit-train] adapter saved in /repo/runs/x\n", ["[lorakit-train] adapter saved in runs/x"]),
    ("Traceback (most recent call last):\nValueError: no\n", ["ValueError: no"]),
    ("", []),
])
def test_key_lines(log, expected):
    assert launch.key_lines(log, root=Path("/repo")) == expected


def test_lorakit_train_runs_the_cli_in_a_fresh_process():
    code, log = launch.lorakit_train(["--bogus", "3"])
    assert code == 2
    assert launch.key_lines(log) == ["lorakit-train: error: unrecognized arguments: ['--bogus', '3']; see "
                                     "lorakit-train --help"]


@pytest.mark.parametrize("ranks, launcher", [
    (1, [sys.executable, "-m", "lorakit.train"]),
    (2, [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]),
])
def test_lorakit_train_launcher(ranks, launcher, monkeypatch):
    calls = []

    def fake_run(command, **kwargs):
        calls.append((command, kwargs))
        return subprocess.CompletedProcess(command, 0, "out\n", "err\n")

    monkeypatch.setattr(launch.subprocess, "run", fake_run)
    assert launch.lorakit_train(["--output_dir", "x"], ranks=ranks) == (0, "out\nerr\n")
    (command, kwargs), = calls
    assert command[:len(launcher)] == launcher and command[-4:] == ["-m", "lorakit.train", "--output_dir", "x"]
    assert kwargs["cwd"] == launch.ROOT and kwargs["env"]["OMP_NUM_THREADS"] == "1"
