"""What matters in LoRA, measured on the course's task: a grid of lorakit-train settings, several seeds each.

    python -m lorakit.experiments --out data/experiments/grid.json          # the full grid (make experiments)
    python -m lorakit.experiments --only r8 full-lr1e-02 --seeds 0 --out x.json
    from lorakit.experiments import GRID, run_point, skill_scores

Every run trains the embedded tiny Llama on the reversal task for the same budget (STEPS optimizer steps of batch 16,
lorakit-train's other defaults: AdamW, 20 warm-up steps then linear decay, LoRA dropout 0.05) and records held-out
exact match, training seconds, trainable parameters, the peak memory of one training step, and the base's nine
pretraining skills re-measured after training (forgetting: notebook 00's 400 questions, grouped as there). A run
builds its model exactly as lorakit-train does (lorakit.train.load_model: fp32, or 4-bit NF4 under q_lora) and adds
peft's LoraConfig with two fields lorakit-train does not expose (use_rslora, use_dora); "full" trains every weight
through the same data path and Trainer. Each run uses a fixed number of torch threads (THREADS), so its result does not
depend on how many runs share the machine. Summaries and figures: lorakit.experiments_report.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import torch

from lorakit.train import lora_config  # sets DS_ACCELERATOR and quiets bitsandbytes first

STEPS = 400          # the equal training budget of every row: optimizer steps of batch 16 (lorakit-train: 1,900)
SEEDS = (0, 1, 2)
THREADS = 1          # torch threads per run; results depend on it (float reduction order), so it is fixed
# Measured once here (2 cores shared with other jobs, load average ~10; 4 runs of 200 steps, identical results each
# way): one run at a time with 1 thread 51.8 s; two runs in parallel with 1 thread each 90.7 s (plus two spawned
# interpreters); one at a time with 2 threads did not finish in 720 s (two OpenMP threads on busy cores spin-wait).
PARALLEL = {"sequential_1_thread_s": 51.8, "two_parallel_1_thread_s": 90.7, "sequential_2_threads_s": "> 720",
            "chosen": "one run at a time, 1 torch thread"}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = (*ATTENTION, "gate_proj", "up_proj", "down_proj")
SKILL_SEED, SKILL_QUESTIONS = 2024, 400  # notebook 00: fresh questions from the pretraining skill generator
OUT = Path(__file__).resolve().parent.parent / "data" / "experiments" / "grid.json"


@dataclass(frozen=True)
class Setting:
    """One row of the grid. method: "lora", "qlora" (4-bit NF4 base + LoRA) or "full" (every weight trains)."""

    name: str
    group: str
    method: str = "lora"
    r: int = 8
    alpha: float = 16
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    lr: float = 3e-3
    rslora: bool = False
    dora: bool = False

    @property
    def scale(self) -> float:
        """The factor on B A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (self.r ** 0.5 if self.rslora else self.r)


BASE = Setting("r8", "rank")  # lorakit-train's defaults: r 8, alpha 16, q_proj+v_proj, lr 3e-3
GRID: list[Setting] = [
    *(replace(BASE, name=f"r{r}", r=r, alpha=2 * r) for r in (1, 2, 4, 8, 16, 64)),   # rank, alpha = 2r
    *(replace(BASE, name=f"r{r}-alpha16", group="alpha", r=r) for r in (1, 16, 64)),   # fixed alpha: scale 16/r
    *(replace(BASE, name=f"r{r}-rslora", group="alpha", r=r, rslora=True) for r in (16, 64)),  # 16/sqrt(r)
    replace(BASE, name="attention", group="targets", targets=ATTENTION),
    replace(BASE, name="all-linear", group="targets", targets=ALL_LINEAR),
    *(replace(BASE, name=f"lr{lr:.0e}", group="lr", lr=lr) for lr in (1e-3, 1e-2, 3e-2)),  # with r8's 3e-3
    replace(BASE, name="dora", group="dora", dora=True),
    replace(BASE, name="dora-all-linear", group="dora", dora=True, targets=ALL_LINEAR),
    *(replace(BASE, name=f"full-lr{lr:.0e}", group="full", method="full", lr=lr)
      for lr in (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)),  # the tuned rate of full fine-tuning is the best of these
    replace(BASE, name="qlora", group="qlora", method="qlora"),
    replace(BASE, name="qlora-all-linear", group="qlora", method="qlora", targets=ALL_LINEAR),
]
BY_NAME = {setting.name: setting for setting in GRID}


def skill_of(question: str) -> str:
    """Notebook 00's grouping: the word before the colon ('after r: xyz' -> 'after'); questions without one are facts."""
    return question.split(":")[0].split(" ")[0] if ":" in question else "fact"


def skill_records(n: int = SKILL_QUESTIONS, seed: int = SKILL_SEED) -> list[dict]:
    from lorakit.tasks import pretraining_pairs, record

    return [record(f"skill-{i}", q, a) for i, (q, a) in enumerate(itertools.islice(pretraining_pairs(seed), n))]


def skill_scores(model, tokenizer, records: list[dict] | None = None) -> dict[str, float]:
    """Greedy exact match per pretraining skill on notebook 00's 400 fresh questions, plus "all" over the 400."""
    from lorakit.evaluate import predictions

    rows = predictions(model, tokenizer, skill_records() if records is None else records)
    by_skill: dict[str, list[bool]] = defaultdict(list)
    for question, reference, reply in rows:
        by_skill[skill_of(question)].append(reference.strip() == reply)
    scores = {skill: sum(oks) / len(oks) for skill, oks in sorted(by_skill.items())}
    scores["all"] = sum(sum(oks) for oks in by_skill.values()) / len(rows)
    return scores


def _args(setting: Setting, seed: int, steps: int, output_dir: str):
    from lorakit.args import DataArguments, LoraArguments, ModelArguments, TrainingArguments

    training = TrainingArguments(output_dir=output_dir, max_steps=steps, learning_rate=setting.lr, seed=seed,
                                 save_strategy="no", logging_strategy="no", eval_strategy="no", disable_tqdm=True,
                                 use_cpu=not torch.cuda.is_available())
    lora = LoraArguments(lora_r=setting.r, lora_alpha=setting.alpha, lora_target_modules=list(setting.targets),
                         q_lora=setting.method == "qlora")
    from lorakit.models import resolve

    return ModelArguments(str(resolve("tiny"))), DataArguments(), training, lora


def build(setting: Setting, seed: int, model_args, training_args, lora_args):
    """The model to train, as lorakit-train builds it (same loader, seed before the adapter's random init)."""
    from peft import get_peft_model

    from lorakit.train import load_model

    torch.manual_seed(seed)
    model = load_model(model_args, training_args, lora_args)
    if setting.method == "full":
        model.train()
        return model
    config = lora_config(lora_args)
    config.use_rslora, config.use_dora = setting.rslora, setting.dora
    return get_peft_model(model, config)


def step_peak_bytes(model, dataset, collator, lr: float) -> int:
    """Weights and buffers, plus the peak of tensors alive during one training step on the first batch of 16
    (activations, gradients, AdamW's two states), counted exactly by lorakit.meter."""
    from lorakit.meter import peak_allocated

    batch = collator([dataset[i] for i in range(16)])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)

    def step():
        model.train()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    peak = peak_allocated(step)
    weights = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
    return weights + peak


def run_point(setting: Setting, seed: int, steps: int = STEPS, threads: int = THREADS) -> dict:
    """Train one setting with one seed; return its measurements (see the module docstring)."""
    import transformers
    from transformers import AutoTokenizer, PrinterCallback, Trainer

    from lorakit.data import make_supervised_data_module
    from lorakit.evaluate import exact_match
    from lorakit.records import load_records

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model_args, data_args, training_args, lora_args = _args(setting, seed, steps, tmp)
            tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, padding_side="right",
                                                      model_max_length=training_args.model_max_length)
            data = make_supervised_data_module(tokenizer, data_args)
            model = build(setting, seed, model_args, training_args, lora_args)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            model.config.use_cache = False
            trainer = Trainer(model=model, args=training_args, processing_class=tokenizer, **data)
            trainer.remove_callback(PrinterCallback)  # with disable_tqdm it prints the final metrics dict
            start = time.perf_counter()
            output = trainer.train()
            seconds = time.perf_counter() - start
            model.config.use_cache = True
            accuracy = exact_match(model, tokenizer, load_records(data_args.eval_data_path))
            skills = skill_scores(model, tokenizer)
            peak = step_peak_bytes(model, data["train_dataset"], data["data_collator"], setting.lr)
    finally:
        torch.set_num_threads(before)
    return {"name": setting.name, "seed": seed, "steps": steps, "accuracy": accuracy, "skills": skills,
            "train_loss": round(output.training_loss, 6), "train_seconds": round(seconds, 2),
            "trainable_params": trainable, "peak_step_bytes": peak}


def base_skills() -> dict[str, float]:
    from lorakit.models import load_base

    return skill_scores(*load_base("tiny"))


def _worker(job: tuple[Setting, int, int, int]) -> dict:
    from lorakit.course import quiet

    quiet()
    return run_point(*job)


def run_grid(settings: list[Setting], seeds=SEEDS, steps: int = STEPS, workers: int = 1, threads: int = THREADS,
             log=print) -> list[dict]:
    """Every (setting, seed): in this process when workers == 1, else in `workers` spawned processes."""
    jobs = [(s, seed, steps, threads) for s in settings for seed in seeds]
    results = []
    if workers == 1:
        iterator = map(_worker, jobs)
    else:
        pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
        iterator = pool.map(_worker, jobs)
    for i, result in enumerate(iterator, 1):
        results.append(result)
        log(f"[{i}/{len(jobs)}] {result['name']:18s} seed {result['seed']}  exact match {result['accuracy']:5.0%}  "
            f"skills {result['skills']['all']:5.1%}  {result['train_seconds']:5.1f} s", flush=True)
    if workers != 1:
        pool.shutdown()
    return results


def versions() -> dict[str, str]:
    import importlib.metadata as md

    found = {name: md.version(name) for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes")}
    return {"python": platform.python_version(), **found}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorakit.experiments", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="results JSON (default data/experiments/grid.json)")
    parser.add_argument("--only", nargs="*", choices=sorted(BY_NAME), help="grid rows to run (default: all)")
    parser.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--workers", type=int, default=1, help="runs in parallel, each with --threads threads")
    parser.add_argument("--threads", type=int, default=THREADS)
    args = parser.parse_args(argv)
    settings = [BY_NAME[name] for name in args.only] if args.only else GRID
    start = time.perf_counter()
    runs = run_grid(settings, args.seeds, args.steps, args.workers, args.threads)
    result = {
        "command": "python -m lorakit.experiments " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d"), "versions": versions(),
        "machine": {"cpus": os.cpu_count(), "workers": args.workers, "threads_per_run": args.threads,
                    "parallel_measurement": PARALLEL,
                    "note": "a shared 2-core machine: seconds are indicative, accuracies are exact per seed"},
        "budget": {"steps": args.steps, "batch_size": 16, "train_records": 600, "eval_records": 100,
                   "schedule": "AdamW, 20 warm-up steps, linear decay to 0", "lora_dropout": 0.05},
        "wall_seconds": round(time.perf_counter() - start, 1),
        "base_skills": base_skills(), "grid": [asdict(s) for s in settings], "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{len(runs)} runs in {result['wall_seconds']:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
