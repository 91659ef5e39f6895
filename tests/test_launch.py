"""lorakit.launch: free ports, the torchrun command (one machine, or one line per machine), an environment whose warning
filter hides only the measured library noise (a user's own warnings still show), two "machines" joined over loopback
(LOCAL_RANK 0 on both, RANK 0 and 1), lorakit-train in a fresh process, and the deterministic lines of its log."""

import json
import os
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


@pytest.mark.parametrize("backend, node_rank, where", [
    ("c10d", 1, ["--rdzv_backend", "c10d", "--rdzv_endpoint", "10.0.0.1:29400", "--rdzv_id", "job7"]),
    ("static", 1, ["--node_rank", "1", "--master_addr", "10.0.0.1", "--master_port", "29400"]),
])
def test_torchrun_node_command(backend, node_rank, where):
    command = launch.torchrun_node_command(["-m", "lorakit.train"], node_rank, 2, "10.0.0.1:29400", 4, "job7", backend)
    assert command == [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "4", *where,
                       "-m", "lorakit.train"]


@pytest.mark.parametrize("node_rank, nnodes, nproc, backend", [(2, 2, 1, "c10d"), (-1, 2, 1, "c10d"),
                                                               (0, 2, 0, "c10d"), (0, 2, 1, "etcd")])
def test_torchrun_node_command_refuses_impossible_nodes(node_rank, nnodes, nproc, backend):
    with pytest.raises(ValueError, match=f"node_rank={node_rank}"):
        launch.torchrun_node_command(["x.py"], node_rank, nnodes, "127.0.0.1:1", nproc, backend=backend)


# what a rank sees of its place in the job, written into its node's working directory
WHO_AM_I = """import json, os
keys = ("RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
with open(f"rank{os.environ['RANK']}.json", "w") as f:
    json.dump({k: int(os.environ[k]) for k in keys}, f)
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["c10d", "static"])
def test_run_nodes_local_rank_is_0_on_every_node_and_rank_is_not(backend, tmp_path):
    script, disks = tmp_path / "who.py", [tmp_path / "node0", tmp_path / "node1"]
    script.write_text(WHO_AM_I)
    for disk in disks:
        disk.mkdir()
    done = launch.run_nodes([str(script)], nnodes=2, backend=backend, cwd=disks, timeout=300)
    assert [node.returncode for node in done] == [0, 0], [node.stdout[-2000:] for node in done]
    seen = [[json.loads(p.read_text()) for p in disk.glob("rank*.json")] for disk in disks]
    assert sorted(rank["RANK"] for node in seen for rank in node) == [0, 1] and all(len(node) == 1 for node in seen)
    for (rank,) in seen:
        assert rank["LOCAL_RANK"] == 0 and rank["GROUP_RANK"] == rank["RANK"]
        assert rank["WORLD_SIZE"] == 2 and rank["LOCAL_WORLD_SIZE"] == 1
    if backend == "static":  # --node_rank decides; under c10d the rendezvous numbers the nodes itself
        assert [node[0]["RANK"] for node in seen] == [0, 1]


def test_run_nodes_stops_every_node_on_timeout(tmp_path, monkeypatch):
    pids = tmp_path / "pids"
    sleeper = (f"import os, time; open({str(pids)!r}, 'a').write(f'{{os.getpid()}}\\n'); print('up', flush=True); "
               "time.sleep(120)")
    monkeypatch.setattr(launch, "torchrun_node_command", lambda *args: [sys.executable, "-c", sleeper])
    with pytest.raises(subprocess.TimeoutExpired) as expired:
        launch.run_nodes(["x.py"], nnodes=2, timeout=5)
    assert expired.value.output == "== node 0 ==\nup\n== node 1 ==\nup\n"  # what each node said before it hung
    started = [int(pid) for pid in pids.read_text().split()]
    assert len(started) == 2
    for pid in started:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # gone, and reaped: no node outlives the call


def test_run_nodes_wants_one_working_directory_or_one_per_node(tmp_path):
    with pytest.raises(ValueError, match="3 working directories for 2 nodes"):
        launch.run_nodes(["x.py"], nnodes=2, cwd=[tmp_path] * 3)


def test_lorakit_train_on_nodes(monkeypatch):
    calls = []

    def fake_nodes(module_args, nnodes, nproc_per_node, **kwargs):
        calls.append((module_args, nnodes, nproc_per_node, kwargs))
        return [subprocess.CompletedProcess("a", 0, "zero\n", ""), subprocess.CompletedProcess("b", 3, "one\n", "")]

    monkeypatch.setattr(launch, "run_nodes", fake_nodes)
    assert launch.lorakit_train(["--output_dir", "x"], nodes=2) == (3, "== node 0 ==\nzero\n== node 1 ==\none\n")
    (module_args, nnodes, nproc, kwargs), = calls
    assert module_args == ["-m", "lorakit.train", "--output_dir", "x"] and (nnodes, nproc) == (2, 1)
    assert kwargs["cwd"] == launch.ROOT
