"""lorakit-train across machines, on one: two torchrun "nodes" of one CPU rank each under ZeRO-3, joined by the c10d
rendezvous on 127.0.0.1, each node in its own working directory (its own disk, as machines without a shared filesystem).

What differs from one machine with two ranks is that LOCAL_RANK is 0 on both nodes while RANK is 0 and 1: a file
written by "local rank 0" instead of "global rank 0" would show up in the second node's directory. The adapter lands
once, on global rank 0's node, reloads in stock peft, and equals the 1-node x 2-rank run's exactly.

    .venv/bin/pytest -p no:cacheprovider -o addopts="" tests/test_multinode.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit.launch import run_nodes, run_ranks
from lorakit.models import TASK_DIR
from lorakit.runs import MARKER, STAMP
from lorakit.zero3 import CONFIGS, load_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "data" / "tiny"
ADAPTER = "adapter_model.safetensors"
# what global rank 1 writes on its own node: its ZeRO-3 partition of the checkpoint and its RNG state, nothing else
RANK1_FILES = {"checkpoint-2/rng_state_1.pth", "checkpoint-2/global_step2/zero_pp_rank_1_mp_rank_00_model_states.pt",
               "checkpoint-2/global_step2/zero_pp_rank_1_mp_rank_00_optim_states.pt"}


def flags(shared: Path, output_dir: str | Path) -> list[str]:
    """2 steps of 4 records per rank, one checkpoint at step 2; data and config at one path every node reads."""
    return ["-m", "lorakit.train", "--output_dir", str(output_dir), "--data_path", str(shared / "train.jsonl"),
            "--eval_data_path", "", "--per_device_train_batch_size", "4", "--max_steps", "2", "--warmup_steps", "0",
            "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1", "--disable_tqdm", "True",
            "--seed", "3", "--deepspeed", str(shared / "zero3.json")]


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """The "shared filesystem": 16 task records, and zero3.json with every tensor partitioned (persistence threshold
    0), so that each node holds half of every LoRA matrix and saving must gather it across the nodes."""
    folder = tmp_path_factory.mktemp("shared")
    records = (TASK_DIR / "train.jsonl").read_text().splitlines(keepends=True)[:16]
    (folder / "train.jsonl").write_text("".join(records))
    (folder / "zero3.json").write_text(json.dumps(load_config(CONFIGS / "zero3.json", persistence_threshold=0)))
    return folder


@pytest.fixture(scope="module")
def nodes(shared, tmp_path_factory) -> tuple[list[Path], list[str]]:
    """(each node's `run` directory, each node's log) of `torchrun --nnodes 2 --nproc_per_node 1 --rdzv_backend c10d
    --rdzv_endpoint 127.0.0.1:PORT -m lorakit.train --output_dir run ...` started once per node."""
    disks = [tmp_path_factory.mktemp(f"node{i}") for i in range(2)]
    done = run_nodes(flags(shared, "run"), nnodes=2, nproc_per_node=1, cwd=disks, timeout=300)
    for node in done:
        assert node.returncode == 0, node.stdout[-3000:]
    return [disk / "run" for disk in disks], [node.stdout for node in done]


@pytest.fixture(scope="module")
def two_ranks(shared, tmp_path_factory) -> Path:
    """The same flags on one machine: `torchrun --nproc_per_node 2 -m lorakit.train --output_dir DIR ...`."""
    out = tmp_path_factory.mktemp("one_node") / "run"
    done = run_ranks(flags(shared, out), nproc=2, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else set()


def test_the_adapter_is_written_once_by_global_rank_0(nodes):
    runs, logs = nodes
    first = [i for i, run in enumerate(runs) if (run / MARKER).is_file()]
    assert len(first) == 1, [sorted(files(run)) for run in runs]  # c10d, not --node_rank, picks which node is rank 0
    rank0, rank1 = runs[first[0]], runs[1 - first[0]]
    assert "trainable params" in logs[first[0]] and "trainable params" not in logs[1 - first[0]]
    assert "[lorakit-train] adapter saved in run" in logs[first[0]]
    assert files(rank1) == RANK1_FILES  # LOCAL_RANK is 0 there too: nothing "once per node" was written
    top = files(rank0) - {f for f in files(rank0) if f.startswith("checkpoint-")}
    assert top == {ADAPTER, "adapter_config.json", "README.md", MARKER, "trainer_state.json", "tokenizer.json",
                   "tokenizer_config.json", "chat_template.jinja"}  # one adapter, no temporary or partial file
    assert json.loads((rank0 / MARKER).read_text())["finished_step"] == 2
    stamped = json.loads((rank0 / "checkpoint-2" / STAMP).read_text())["files"]
    assert set(stamped) == files(rank0 / "checkpoint-2") - {STAMP}  # complete as far as this node can see


def logits(adapter: Path | None, probe: dict) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))  # stock peft, onto the plain base
    with torch.no_grad():
        return model.eval()(**probe).logits


def test_together_the_nodes_write_what_one_machine_with_two_ranks_writes(nodes, two_ranks):
    (first, second), _ = nodes
    assert not files(first) & files(second)  # no file written on both nodes
    assert files(first) | files(second) == files(two_ranks)  # a shared filesystem would hold the one-machine layout


def test_stock_peft_reloads_it_and_it_equals_the_one_node_two_rank_run(nodes, two_ranks):
    run = next(run for run in nodes[0] if (run / ADAPTER).is_file())
    saved, single = load_file(str(run / ADAPTER)), load_file(str(two_ranks / ADAPTER))
    assert saved.keys() == single.keys() and len(saved) == 8
    # the same world size, seed and gloo sums in the same order: the topology does not change a single bit
    assert max((saved[k] - single[k]).abs().max().item() for k in saved) == 0.0
    at_checkpoint = load_file(str(run / "checkpoint-2" / ADAPTER))  # written by the Trainer's own ZeRO-3 gather
    assert all(torch.equal(saved[k], at_checkpoint[k]) for k in saved)
    assert all(saved[k].abs().max() > 0 for k in saved if "lora_B" in k)  # trained, not the zero initialisation

    tokenizer = AutoTokenizer.from_pretrained(TINY)
    prompts = [json.loads(line)["conversations"][0]["value"] for line in
               (TASK_DIR / "eval.jsonl").read_text().splitlines()[:4]]
    probe = tokenizer(prompts, return_tensors="pt", padding=True)
    across, within, base = logits(run, probe), logits(two_ranks, probe), logits(None, probe)
    assert (across - within).abs().max().item() == 0.0
    assert (across - base).abs().max().item() > 1e-4  # the reloaded adapter changes the model
