"""Launch on this machine's CPUs: N local ranks under torchrun, and lorakit-train as a subprocess with a readable log.

Several CPU processes on one laptop need three things that a GPU cluster's launcher gives for free: a free rendezvous
port (another job may hold torchrun's default 29500), one OpenMP thread per rank (two ranks on two cores with default
threading run 10-50x slower), and a place to cache the C++ op DeepSpeed JIT-compiles on first use. `launch_env` and
`run_ranks` provide them; `lorakit_train` and `key_lines` are how notebook 07 runs the CLI and shows its outcome.

    from lorakit.launch import run_ranks, lorakit_train, key_lines
    run_ranks(["-m", "lorakit.zero3_demo", "--out", "runs/zero3-demo"], nproc=2)   # torchrun, output captured
    code, log = lorakit_train(["--output_dir", "runs/x", "--max_steps", "5"], ranks=2)
    print("\\n".join(key_lines(log)))
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
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


def lorakit_train(flags: Sequence[str], ranks: int = 1, env: Mapping[str, str] | None = None,
                  cwd: str | os.PathLike = ROOT, timeout: float | None = None) -> tuple[int, str]:
    """Run `lorakit-train <flags>` in a fresh process (under torchrun when ranks > 1); return (exit code, full log).

    A fresh process is the honest test of a command line, and the only way to get several ranks from a notebook.

    Args:
        flags: the command-line flags, as in sys.argv[1:], e.g. ["--output_dir", "runs/x", "--lora_r", "8"].
        ranks: processes; 1 runs `python -m lorakit.train`, more run it under torchrun on a free port.
        env: the environment; launch_env() when None.
        cwd: the working directory, against which relative paths in `flags` resolve; the repository by default.
        timeout: seconds before the run is killed (subprocess.TimeoutExpired); None waits.
    Returns:
        (the exit code, stdout followed by stderr).
    """
    module = ["-m", "lorakit.train", *flags]
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
