"""Launch on this machine's CPUs: N local ranks under torchrun, N "nodes" joined over loopback, and lorakit-train as a
subprocess with a readable log.

Several CPU processes on one laptop need three things that a GPU cluster's launcher gives for free: a free rendezvous
port (another job may hold torchrun's default 29500), one OpenMP thread per rank (two ranks on two cores with default
threading run 10-50x slower), and a place to cache the C++ op DeepSpeed JIT-compiles on first use. `launch_env` and
`run_ranks` provide them; `lorakit_train` and `key_lines` are how notebook 07 runs the CLI and shows its outcome.

`run_nodes` starts one torchrun launcher per "node", each its own process tree as on separate machines, joined by
torchrun's c10d rendezvous on 127.0.0.1: what differs across machines (LOCAL_RANK is 0 on every node, RANK is not)
then shows on one. On a real cluster each machine runs its own line of `torchrun_node_command` (README, "Across
machines").

    from lorakit.launch import run_ranks, run_nodes, lorakit_train, key_lines
    run_ranks(["-m", "lorakit.zero3_demo", "--out", "runs/zero3-demo"], nproc=2)   # torchrun, output captured
    code, log = lorakit_train(["--output_dir", "runs/x", "--max_steps", "5"], ranks=2)
    code, log = lorakit_train(["--output_dir", "runs/y", "--max_steps", "5"], nodes=2)   # 2 nodes x 1 rank
    print("\\n".join(key_lines(log)))
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository: relative paths in lorakit-train flags resolve here

# Python warnings that a 2-rank ZeRO-3 run and a lorakit-train run print although nobody can act on them (measured
# with torch 2.13 / transformers 5 / DeepSpeed 0.18): DeepSpeed calls torch.distributed collectives that torch has
# deprecated (one FutureWarning per collective per step and rank, from c10d_logger), and peft / the Trainer query the
# gradient-checkpointing attributes that transformers renamed for v6. Ignored by exact module, so a warning raised by
# the user's own code, and any other library warning (peft's PeftWarning about 0-element LoRA tensors, which names a
# real bug), still shows.
LIBRARY_NOISE = (
    "ignore::FutureWarning:torch.distributed.c10d_logger",
    "ignore::FutureWarning:transformers.modeling_utils",
    "ignore::FutureWarning:transformers.training_args",
)

# lorakit-train's deterministic lines: its own one-line messages and errors, and the trainable-parameter count
KEY_PREFIXES = ("[lorakit-train]", "lorakit-train: error:", "trainable params", "ValueError")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on now, chosen by the OS (bind to port 0).

    The port is released before it is returned, so another process could take it in between; the OS hands out
    ephemeral ports in rotation, which makes that rare enough for a local launcher.

    Args:
        host: the interface to bind, loopback by default.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def launch_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for CPU ranks: one OpenMP thread each, no tokenizer threads, DeepSpeed's JIT-built ops cached.

    PYTHONWARNINGS keeps whatever `base` already has and appends LIBRARY_NOISE; later entries win, so only those
    library warnings are hidden and a user's own setting (e.g. error::UserWarning) still applies to everything else.

    Args:
        base: the environment to start from; os.environ when None.
    """
    env = dict(os.environ if base is None else base)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONWARNINGS"] = ",".join(filter(None, [env.get("PYTHONWARNINGS", ""), *LIBRARY_NOISE]))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "lorakit" / "torch_extensions"))
    return env


def torchrun_command(module_args: Sequence[str], nproc: int = 2, port: int | None = None) -> list[str]:
    """`torchrun --nproc_per_node nproc --master_port port <module_args>` as an argv list, with this Python.

    `python -m torch.distributed.run` is torchrun without relying on the console script being on PATH.

    Args:
        module_args: what follows torchrun's options, e.g. ["-m", "lorakit.train", "--output_dir", "runs/x"].
        nproc: the number of ranks (processes) on this machine.
        port: the rendezvous port; a free one when None.
    """
    if nproc < 1:
        raise ValueError(f"nproc={nproc}: a launch needs at least one rank")
    port = free_port() if port is None else port
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
            *module_args]


def run_ranks(module_args: Sequence[str], nproc: int = 2, timeout: float = 600,
              env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `torchrun --nproc_per_node nproc <module_args>` on this machine's CPUs, on a free port; output captured.

    Args:
        module_args: what follows torchrun's options, e.g. ["-m", "lorakit.zero3_demo", "--out", "DIR"].
        nproc: the number of ranks.
        timeout: seconds before the run is killed (subprocess.TimeoutExpired).
        env: the environment; launch_env() when None.
    """
    return subprocess.run(torchrun_command(module_args, nproc), env=launch_env() if env is None else dict(env),
                          capture_output=True, text=True, timeout=timeout)


def torchrun_node_command(module_args: Sequence[str], node_rank: int, nnodes: int, endpoint: str,
                          nproc_per_node: int = 1, rdzv_id: str = "lorakit", backend: str = "c10d") -> list[str]:
    """One machine's torchrun line of an `nnodes`-machine job, as an argv list with this Python; every machine runs it.

    c10d (the default): `torchrun --nnodes N --nproc_per_node k --rdzv_backend c10d --rdzv_endpoint HOST:PORT
    --rdzv_id ID <module_args>`, the same line on every machine. The rendezvous numbers the nodes itself (sorted by
    host name, then launcher pid), so which machine holds global rank 0 is not chosen; torchrun ignores --node_rank
    there (and says so), so it is not passed. static: `torchrun --nnodes N --node_rank R --nproc_per_node k
    --master_addr HOST --master_port PORT <module_args>`, where machine R holds ranks R*k ... R*k+k-1 and HOST must
    be machine 0.

    Args:
        module_args: what follows torchrun's options, e.g. ["-m", "lorakit.train", "--output_dir", "runs/x"].
        node_rank: this machine's index, 0 .. nnodes-1 (used by the static backend only).
        nnodes: the number of machines.
        endpoint: "HOST:PORT" every machine can reach: the c10d store, or machine 0 (static).
        nproc_per_node: ranks on this machine (its GPUs, or CPU processes).
        rdzv_id: the job's name in the c10d store; the same on every machine, new for each job.
        backend: "c10d" or "static".
    """
    if not 0 <= node_rank < nnodes or nproc_per_node < 1 or backend not in ("c10d", "static"):
        raise ValueError(f"node_rank={node_rank}, nnodes={nnodes}, nproc_per_node={nproc_per_node}, "
                         f"backend={backend!r}: need 0 <= node_rank < nnodes, a rank per node, c10d or static")
    host, _, port = endpoint.rpartition(":")
    if backend == "c10d":
        where = ["--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", rdzv_id]
    else:
        where = ["--node_rank", str(node_rank), "--master_addr", host, "--master_port", port]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc_per_node",
            str(nproc_per_node), *where, *module_args]


def run_nodes(module_args: Sequence[str], nnodes: int = 2, nproc_per_node: int = 1, backend: str = "c10d",
              timeout: float = 600, env: Mapping[str, str] | None = None,
              cwd: str | os.PathLike | Sequence[str | os.PathLike] = ROOT) -> list[subprocess.CompletedProcess]:
    """Run an `nnodes`-machine torchrun job on this machine: one launcher per node, joined over 127.0.0.1.

    Every launcher starts before any is waited on (the rendezvous waits for all nodes); each one's output goes to its
    own file, so a node that fills its pipe cannot stall the others. On a timeout every launcher still running gets
    SIGTERM, which torchrun passes on to its ranks, then subprocess.TimeoutExpired is raised with every node's log
    as its output.

    Args:
        module_args: what follows torchrun's options, e.g. ["-m", "lorakit.train", "--output_dir", "runs/x"].
        nnodes: the number of "machines" (torchrun launchers).
        nproc_per_node: ranks per node.
        backend: torchrun's rendezvous, "c10d" or "static" (torchrun_node_command).
        timeout: seconds for the whole job.
        env: the environment of every node; launch_env() when None.
        cwd: the working directory of every node, or one per node: each node then has its own "disk", and a
            relative path such as `--output_dir run` lands on each node's own copy, as on machines without a
            shared filesystem.
    Returns:
        one CompletedProcess per launcher, node_rank 0 first (c10d numbers the nodes itself), with stdout and
        stderr together in .stdout.
    """
    port = free_port()
    commands = [torchrun_node_command(module_args, node, nnodes, f"127.0.0.1:{port}", nproc_per_node,
                                      f"lorakit-{os.getpid()}-{port}", backend) for node in range(nnodes)]
    env = launch_env() if env is None else dict(env)
    cwds = [cwd] * nnodes if isinstance(cwd, str | os.PathLike) else list(cwd)
    if len(cwds) != nnodes:
        raise ValueError(f"{len(cwds)} working directories for {nnodes} nodes: give one, or one per node")
    logs = [tempfile.TemporaryFile("w+") for _ in commands]
    nodes: list[subprocess.Popen] = []
    deadline, timed_out = time.monotonic() + timeout, False
    try:
        for command, log, folder in zip(commands, logs, cwds, strict=True):
            nodes.append(subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          text=True))
        for node in nodes:
            node.wait(timeout=max(deadline - time.monotonic(), 0.01))
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        for node in nodes:
            _stop(node)
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    if timed_out:  # the logs are the only clue to which node hung, and where
        raise subprocess.TimeoutExpired(commands[0], timeout, output="".join(
            f"== node {i} ==\n{text}" for i, text in enumerate(outputs)))
    return [subprocess.CompletedProcess(command, node.returncode, text, "")
            for command, node, text in zip(commands, nodes, outputs, strict=True)]


def _stop(node: subprocess.Popen) -> None:
    """SIGTERM a launcher still running (torchrun passes it on to its ranks), SIGKILL it after 30 s."""
    if node.poll() is None:
        node.terminate()
        try:
            node.wait(timeout=30)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()


def lorakit_train(flags: Sequence[str], ranks: int = 1, env: Mapping[str, str] | None = None,
                  cwd: str | os.PathLike = ROOT, timeout: float | None = None, nodes: int = 1) -> tuple[int, str]:
    """Run `lorakit-train <flags>` in a fresh process (under torchrun when ranks > 1); return (exit code, full log).

    A fresh process is the honest test of a command line, and the only way to get several ranks from a notebook.

    Args:
        flags: the command-line flags, as in sys.argv[1:], e.g. ["--output_dir", "runs/x", "--lora_r", "8"].
        ranks: processes (per node); 1 runs `python -m lorakit.train`, more run it under torchrun on a free port.
        env: the environment; launch_env() when None.
        cwd: the working directory, against which relative paths in `flags` resolve; the repository by default.
        timeout: seconds before the run is killed (subprocess.TimeoutExpired); None waits.
        nodes: more than 1 runs `ranks` ranks on each of `nodes` torchrun "machines" joined over loopback (run_nodes).
    Returns:
        (the exit code, stdout followed by stderr); with nodes > 1 the first non-zero code of any node and the logs
        of all nodes, each after a "== node N ==" line.
    """
    module = ["-m", "lorakit.train", *flags]
    if nodes > 1:
        done = run_nodes(module, nodes, ranks, timeout=600 if timeout is None else timeout, env=env, cwd=cwd)
        code = next((node.returncode for node in done if node.returncode), 0)
        return code, "".join(f"== node {i} ==\n{node.stdout}" for i, node in enumerate(done))
    command = torchrun_command(module, ranks) if ranks > 1 else [sys.executable, *module]
    done = subprocess.run(command, cwd=cwd, env=launch_env() if env is None else dict(env), capture_output=True,
                          text=True, timeout=timeout)
    return done.returncode, done.stdout + done.stderr


def key_lines(log: str, root: str | os.PathLike = ROOT, prefixes: Sequence[str] = KEY_PREFIXES) -> list[str]:
    """The deterministic lines of a log, once each, in order: those starting with one of `prefixes`.

    The Trainer's own lines carry timings and progress bars, and every rank repeats lorakit's lines (torchrun may
    prefix them with "[rankN]: "), so a notebook that printed the whole log would differ on every run.

    Args:
        log: the text of a run, e.g. the second item lorakit_train returns.
        root: a directory whose absolute path is cut from the lines ("<root>/runs/x" -> "runs/x").
        prefixes: which lines to keep.
    """
    keep: list[str] = []
    for line in log.splitlines():
        line = re.sub(r"^\[rank\d+\]:\s*", "", line).replace(str(root) + os.sep, "")
        if line.startswith(tuple(prefixes)) and line not in keep:
            keep.append(line)
    return keep
