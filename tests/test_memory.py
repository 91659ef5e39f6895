"""lorakit.memory against reality: exact parameter counts, DeepSpeed's estimators, bitsandbytes' NF4 storage, and the
measured peak of real training steps on the embedded model (lorakit.meter, op by op).

    .venv/bin/pytest tests/test_memory.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lorakit import memory, memory_check, memory_cli, zero3
from lorakit.models import resolve

ROOT = Path(__file__).resolve().parent.parent
EVERY = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The meter's per-op hook dominates on the tiny model; a second thread only adds contention on 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name, params", [  # published parameter counts of the released checkpoints
    ("llama-2-7b", 6_738_415_616), ("llama-2-13b", 13_015_864_320), ("llama-2-70b", 68_976_648_192),
    ("llama-3.1-8b", 8_030_261_248), ("llama-3.1-70b", 70_553_706_496), ("mistral-7b", 7_241_732_096),
    ("qwen2.5-7b", 7_615_616_512), ("smollm2-135m", 134_515_008), ("smollm2-360m", 361_821_120),
    ("smollm2-1.7b", 1_711_376_384)])
def test_bundled_configs_count_parameters_exactly(name, params):
    assert memory.shapes(name).params == params


def test_counts_equal_a_real_model():
    model, _ = __import__("lorakit.models", fromlist=["load_base"]).load_base("tiny")
    shapes = memory.shapes(resolve("tiny"))
    assert shapes.params == sum(p.numel() for p in model.parameters()) == 407_040
    assert shapes.buffers == sum(b.numel() * b.element_size() for b in model.buffers())


# The embedded model, measured op by op: full / LoRA / QLoRA x checkpointing x two sizes (the notebook's table).
GRID = memory_check.grid([(8, 128), (16, 256)])


@pytest.mark.parametrize("cell", GRID, ids=lambda c: f"{c['method']}-gc{int(c['checkpointing'])}-{c['batch']}x{c['seq']}")
def test_prediction_within_ten_percent_of_the_measured_peak(cell):
    path = resolve("tiny")
    measured, predicted = memory_check.measure(path, **cell), memory.plan(path, **cell).peak
    assert abs(predicted / measured - 1) <= 0.10, (cell, predicted, measured)
    assert abs(predicted / measured - 1) <= 0.001, f"the derivation no longer matches op by op: {cell}"


@pytest.mark.parametrize("cell", [  # the terms the default grid does not reach
    dict(method="lora", lora_targets=EVERY, checkpointing=True), dict(method="qlora", lora_targets=EVERY),
    dict(method="lora", lora_dropout=0.0, lora_targets=EVERY), dict(method="lora", attention="eager", dtype="bf16"),
    dict(method="full", attention="eager", checkpointing=True, dtype="bf16"),
    dict(method="qlora", dtype="bf16", lora_targets=("o_proj", "up_proj"), checkpointing=True)], ids=str)
def test_variants_match_measurement(cell):
    cell = dict(cell, batch=4, seq=128, device="cpu")
    cell.setdefault("dtype", "fp32")
    path = resolve("tiny")
    measured, predicted = memory_check.measure(path, **cell), memory.plan(path, **cell).peak
    assert abs(predicted / measured - 1) <= 0.005, (cell, predicted, measured)


def test_committed_smollm2_measurements_agree_with_the_planner():
    """data/memory/smollm2-135m-cpu.json (python -m lorakit.memory_check --model smollm2 --out ...) re-planned now."""
    data = json.loads((ROOT / "data" / "memory" / "smollm2-135m-cpu.json").read_text())
    assert len(data["rows"]) == 12
    for row in data["rows"]:
        cell = {k: row[k] for k in ("method", "checkpointing", "batch", "seq", "device", "dtype")}
        assert abs(memory.plan("smollm2-135m", **cell).peak / row["measured"] - 1) <= 0.10, row


@pytest.mark.real_model
def test_smollm2_cell_measured_again():
    cell = dict(method="lora", checkpointing=True, batch=1, seq=128, device="cpu", dtype="fp32")
    path = resolve("smollm2")
    assert abs(memory.plan(path, **cell).peak / memory_check.measure(path, **cell) - 1) <= 0.01


@pytest.mark.parametrize("params, gpus, stage, offload", [
    (6_738_415_616, 8, 2, "none"), (6_738_415_616, 1, 2, "none"), (6_738_415_616, 8, 2, "optimizer"),
    (65_285_660_672, 64, 3, "none"), (65_285_660_672, 8, 3, "optimizer"), (65_285_660_672, 8, 3, "all"),
    (407_040, 2, 3, "none")])
def test_model_states_equal_deepspeeds_estimators(params, gpus, stage, offload):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed prints its accelerator choice on import otherwise
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    # the printing entry points users call, next to the functions that compute their numbers
    assert callable(stage_1_and_2.estimate_zero2_model_states_mem_needs_all_cold)
    assert callable(stage3.estimate_zero3_model_states_mem_needs_all_cold)
    largest = 32_000 * 8192  # the largest layer: an embedding
    ours = sum(memory.model_states(params, gpus, stage, offload, largest).values())
    if stage == 2:
        _, theirs = stage_1_and_2.estimate_zero2_model_states_mem_needs(params, gpus, 1, offload != "none")
    else:
        _, theirs, _ = stage3.estimate_zero3_model_states_mem_needs(params, largest, gpus, 1, offload != "none",
                                                                    offload == "all")
    assert int(ours) == theirs


@pytest.mark.parametrize("params, gpus, stage", [(1e6, 1, 0), (7e9, 8, 1), (7e9, 8, 2), (65e9, 64, 3), (123_457, 3, 3)])
def test_paper_arithmetic_equals_lorakit_zero3(params, gpus, stage):
    ours = sum(memory.model_states(params, gpus, stage, paper=True).values())
    assert ours == pytest.approx(zero3.zero_memory_bytes(params, gpus, stage), rel=1e-12)


def test_full_fine_tuning_under_deepspeed_plans_the_estimators_states():
    plan = memory.plan("llama-2-7b", method="full", zero=3, ranks=8, batch=1, seq=512, checkpointing=True)
    states = memory.model_states(plan.trained, 8, 3, largest_layer=32_000 * 4096)
    assert plan.parts["optimizer states"] == int(states["optimizer states"])
    assert plan.parts["gathered layer"] == int(states["gathered layer"])


def test_nf4_bytes_equal_what_bitsandbytes_keeps():
    from lorakit import quant

    model = quant.load_in_4bit(resolve("tiny"))
    report, shapes = quant.memory_report(model), memory.shapes(resolve("tiny"))
    expected = report["linear weights"] + report["quantisation constants"]
    assert shapes.layers * sum(memory.nf4_bytes(i * o) for _, i, o, _ in shapes.linear) == expected
    plan = memory.plan(resolve("tiny"), method="qlora", dtype="fp32", device="cpu", batch=1, seq=8)
    assert plan.parts["weights"] == expected + report["embeddings and head"] + report["norms and other"]


def test_inline_copy_in_notebook_08_equals_layer_terms():
    from lorakit.course import code_cells

    source = code_cells(ROOT / "notebooks" / "08_will_it_fit.ipynb", "# inline: lorakit.memory.layer_terms")
    namespace: dict = {}
    exec(source.split("\n\n\n")[0], namespace)  # the function only, not the cell's prints
    for name in ("smollm2-135m", "llama-3.1-8b", "qwen2.5-7b", resolve("tiny")):
        sh = memory.shapes(name)
        dims = dict(C=sh.hidden, M=sh.inter, H=sh.heads, Hkv=sh.kv_heads, D=sh.head_dim)
        for method, dtype, device, targets in [("full", "fp32", "cpu", None), ("lora", "fp32", "cpu", ("q_proj", "v_proj")),
                                               ("qlora", "fp32", "cpu", EVERY), ("lora", "bf16", "cuda", EVERY),
                                               ("full", "bf16", "cuda", None)]:
            setup = memory.Setup(method=method, dtype=dtype, device=device, lora_targets=targets or ("q_proj",))
            act, mask = (4, 4) if dtype == "fp32" else (2, 1)
            inline = namespace["saved_per_token"](**dims, method=method, act=act, mask=mask, targets=targets)
            assert inline == memory._saved(memory.layer_terms(sh, setup)), (name, method, dtype)


@pytest.mark.parametrize("bad, fragment", [
    (dict(method="lorax"), "method='lorax'"), (dict(batch=0), "batch=0"), (dict(lora_targets=("c_attn",)), "c_attn"),
    (dict(ranks=8), "set zero"), (dict(zero=2, offload="all"), "needs zero=3"), (dict(dtype="int8"), "dtype")])
def test_setup_refuses_what_it_cannot_plan(bad, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        memory.Setup(**bad)


def test_unknown_model_names_the_choices():
    with pytest.raises(FileNotFoundError, match="llama-2-7b"):
        memory.plan("no-such-model")
    with pytest.raises(ValueError, match="Llama-style"):
        memory.shapes(dict(model_type="gpt2", n_layer=2, n_embd=64, n_head=2, vocab_size=100))


def test_checkpointing_zero3_and_qlora_each_lower_the_peak():
    base = dict(method="full", batch=4, seq=2048)
    full = memory.plan("llama-2-7b", **base).peak
    assert memory.plan("llama-2-7b", **base, checkpointing=True).peak < full
    assert memory.plan("llama-2-7b", **base, zero=3, ranks=8).peak < full
    lora = memory.plan("llama-2-7b", **{**base, "method": "lora"}, checkpointing=True)
    qlora = memory.plan("llama-2-7b", **{**base, "method": "qlora"}, checkpointing=True)
    assert qlora.parts["weights"] < lora.parts["weights"] / 3 and qlora.peak < lora.peak < full


def test_cli_says_whether_it_fits_and_what_would(capsys):
    assert memory_cli.main(["--model", "llama-2-7b", "--method", "qlora", "--seq", "2048", "--batch", "4",
                            "--gpu-memory", "24"]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit in 24 GiB" in out and "- gradient checkpointing" in out and "loss backward" in out
    assert memory_cli.main(["--model", "smollm2-135m", "--gpu-memory", "80", "--lora_targets", *EVERY]) == 0
    assert "fits in 80 GiB" in capsys.readouterr().out
    assert memory_cli.main(["--list"]) == 0 and "6,738,415,616" in capsys.readouterr().out


@pytest.mark.parametrize("argv, fragment", [(["--model", "nope"], "no model config 'nope'"),
                                            (["--model", "llama-2-7b", "--zero", "2", "--offload", "all"], "zero=3"),
                                            ([], "--model is required")])
def test_cli_mistake_is_one_error_line(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        memory_cli.main(argv)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and "error:" in last and fragment in last, last


def test_memory_py_copies_out_alone(tmp_path):
    """Copied alone into an empty folder where lorakit cannot be imported, its docstring example runs."""
    shutil.copy(ROOT / "lorakit" / "memory.py", tmp_path)
    example = textwrap.dedent(memory.__doc__.split("\n\n")[1]).replace("lorakit.memory", "memory")
    prelude = textwrap.dedent("""
        import sys
        class NoLorakit:
            @staticmethod
            def find_spec(name, path=None, target=None):
                if name == "lorakit" or name.startswith("lorakit."):
                    raise ModuleNotFoundError(f"No module named {name!r}")
        sys.meta_path.insert(0, NoLorakit)
        sys.path.insert(0, "")
    """)
    result = subprocess.run([sys.executable, "-I", "-c", prelude + example], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
