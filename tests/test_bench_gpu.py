"""lorakit.bench_gpu's control flow on the CPU: every section reports results or its error, and nothing stops the run.

The GPU numbers themselves come from one run on a CUDA machine; here the smoke sizes only prove that the script gets
through every section, writes its JSON after each, and survives a broken section or a hung subprocess.
"""

import json
import logging
import tempfile

import pytest

from lorakit import bench_gpu

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# Stands in for `python -m lorakit.train` (run for real by `python -m lorakit.bench_gpu --smoke`): prints the lines
# run_cli reads, in the CLI's own format.
FAKE_CLI = ["-c", "print('trainable params: 7,168 || all params: 414,208 || trainable%: 1.7305'); "
                  "print(\"{'train_runtime': '0.1', 'train_steps_per_second': '11.2'}\"); "
                  "print('[lorakit-train] held-out exact match: 42.0% (data/task/eval.jsonl)')"]


@pytest.fixture(autouse=True)
def temporary_files_in_tmp_path(tmp_path, monkeypatch):
    """bench_gpu's temporary folders (run_cli's --output_dir, the saved model) go under the test's tmp_path.

    torch.compile is switched off meanwhile: bitsandbytes compiles its CPU dequantisation on first use (~20 s with a
    cold cache, and the cache lives in the temporary folder), which is not what these tests are about.
    """
    import torch._dynamo.config

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with torch._dynamo.config.patch(disable=True):
        yield


def result_keys(section: dict) -> set[str]:
    return set(section) - {"section_s", "error", "traceback"}


def test_smoke_run_reports_every_section(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_gpu, "CLI", FAKE_CLI)
    # smaller still than --smoke (which `python -m lorakit.bench_gpu --smoke` runs in about a minute on 2 cores)
    monkeypatch.setattr(bench_gpu, "SMOKE", {**bench_gpu.SMOKE, "lengths": [64], "check_length": 64, "repeats": 1,
                                             "layers": 1, "vocab": 256, "seq": 16, "steps": 1, "nf4_shapes": [(65,)]})
    out = tmp_path / "smoke.json"
    assert bench_gpu.main(["--smoke", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["smoke"] is True and results["total_s"] > 0
    for name in bench_gpu.SECTIONS:
        section = results[name]
        assert "section_s" in section, name
        assert section.get("error") or result_keys(section), f"{name}: neither results nor an error"
    # the sections that need neither bitsandbytes nor a subprocess must succeed outright on the CPU
    assert "error" not in results["env"] and "error" not in results["attention"]
    attention = results["attention"]
    assert attention["errors"] == {}
    assert set(attention["max_abs_diff_vs_fp32_eager_L64"]) == {"eager", "sdpa", "lorakit_tiled"}
    assert all(attention[f"{k} L=64"]["fwd_bwd_ms"] > 0 for k in ("eager", "sdpa", "lorakit_tiled"))
    for row in ("lora gc=off", "lora gc=on", "qlora gc=off", "qlora gc=on"):
        assert "step_ms" in results["qlora"][row] or "error" in results["qlora"][row], row
    cli = results["cli"]
    assert cli["cap"] == "--max_steps 2" and cli["lora"]["cmd"].endswith("--max_steps 2")
    assert cli["qlora"]["cmd"].endswith("--q_lora True --max_steps 2")
    assert cli["lora"]["returncode"] == 0 and "42.0%" in cli["lora"]["exact_match"]
    assert cli["lora"]["trainable"].startswith("trainable params: 7,168")


def test_a_broken_section_is_recorded_and_the_next_ones_run(tmp_path, monkeypatch):
    def broken(res, dev, cfg):
        res["partial"] = 1
        raise RuntimeError("CUDA out of memory (simulated)")

    def fine(res, dev, cfg):
        res["value"] = 1

    monkeypatch.setattr(bench_gpu, "SECTIONS", {"first": broken, "second": fine})
    out = tmp_path / "r.json"
    assert bench_gpu.main(["--smoke", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["first"]["error"] == "RuntimeError: CUDA out of memory (simulated)"
    assert results["first"]["partial"] == 1 and "simulated" in results["first"]["traceback"]
    assert results["second"]["value"] == 1 and "error" not in results["second"]


@pytest.mark.parametrize("script, timeout, expected", [
    ("import time; time.sleep(30)", 1.0, "timeout after 1 s"),
    ("import sys; print('lorakit-train: error: bad flag', file=sys.stderr); sys.exit(2)", 30.0, None),
])
def test_run_cli_records_timeouts_and_failures(monkeypatch, script, timeout, expected):
    monkeypatch.setattr(bench_gpu, "CLI", ["-c", script])
    row = bench_gpu.run_cli(["--max_steps", "2"], timeout)
    assert row.get("error") == expected and row["wall_s"] < 25
    assert row["exact_match"] is None
    if expected is None:
        assert row["returncode"] == 2 and "bad flag" in row["output_tail"]

