"""A real ZeRO-3 LoRA run on CPU ranks, then every way of saving its adapter, for notebook 06, the tests and the bench.

It trains LoRA on the embedded tiny model with the reversal task under lorakit/configs/zero3.json and leaves files
that show what each rank holds and which saves are right (`demo` lists them). Unlike lorakit.zero3, whose functions
it exercises, it uses the course's model, task and collator: it does not copy out alone.

    python -m lorakit.zero3_demo --out DIR                                   # one process
    torchrun --nproc_per_node 2 -m lorakit.zero3_demo --out DIR --steps 30   # two CPU ranks (notebook 06)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from lorakit.zero3 import (
    CONFIGS,
    bias_modes,
    get_peft_state_maybe_zero_3,
    load_config,
    maybe_init_cpu_distributed,
    maybe_zero_3,
    partition_report,
    save_adapter,
)


def demo(out: Path, config: Path = CONFIGS / "zero3.json", steps: int = 60, batch_size: int = 8, lr: float = 3e-3,
         bias: str = "none", persistence_threshold: int | None = 0, saves: bool = True) -> None:
    """LoRA on the embedded model under ZeRO-3, then every way of saving it; run it with one or more ranks.

    Writes to `out`: partition-rank<r>.json; adapters saved by trainer.save_model (save_model/), by
    _zero3_consolidated_16bit_state_dict (consolidated/), by save_adapter (gathered/), and without gathering
    (ungathered/, the bug); the trained model's logits on a probe batch (logits.pt); a DeepSpeed checkpoint
    (run/checkpoint-<steps>); report.json (world size, losses, what each save and reload gave, and whether
    maybe_zero_3 tensor by tensor equals get_peft_state_maybe_zero_3's single gather).

    Args:
        out: the output directory.
        config: a DeepSpeed JSON config.
        steps: optimizer steps.
        batch_size: examples per rank and step.
        lr: the learning rate (constant).
        bias: the LoraConfig bias mode, one of lorakit.zero3.bias_modes() (peft's).
        persistence_threshold: stage3_param_persistence_threshold; 0 partitions every tensor, None keeps the config's.
        saves: False trains and writes the partition reports only (what the bench needs).
    """
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import Trainer, TrainingArguments, set_seed
    from transformers.integrations import is_deepspeed_zero3_enabled
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    from transformers.utils import logging as hf_logging

    from lorakit.data import DataCollator, SupervisedDataset, load_records
    from lorakit.models import TASK_DIR, load_base

    hf_logging.set_verbosity_error()
    ds_config = load_config(config, persistence_threshold)
    maybe_init_cpu_distributed(ds_config)  # before TrainingArguments, which then see the real world size
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    out = Path(out)
    args = TrainingArguments(  # built BEFORE from_pretrained: the model then loads under zero.Init, partitioned
        output_dir=str(out / "run"), deepspeed=ds_config, use_cpu=not torch.cuda.is_available(),
        per_device_train_batch_size=batch_size, max_steps=steps, learning_rate=lr, lr_scheduler_type="constant",
        logging_steps=max(steps // 4, 1), save_strategy="steps" if saves else "no", save_steps=steps, report_to=[],
        disable_tqdm=True, seed=0, data_seed=0, remove_unused_columns=False)
    model, tokenizer = load_base("tiny")
    set_seed(0)  # the LoRA A init draws from the global generator; the Trainer seeds only after this
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                             bias=bias, task_type="CAUSAL_LM"))
    train = SupervisedDataset(load_records(TASK_DIR / "train.jsonl"), tokenizer, tokenizer.model_max_length)
    collate = DataCollator(tokenizer.pad_token_id)

    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate, processing_class=tokenizer)
    trainer.train()
    report = {"world_size": args.world_size, "steps": steps, "bias": bias, "persistence_threshold":
              persistence_threshold, "loss": [round(e["loss"], 4) for e in trainer.state.log_history if "loss" in e]}
    (out / f"partition-rank{rank}.json").write_text(json.dumps(partition_report(trainer.model_wrapped.module)))

    if saves and rank == 0:  # the classic bug: peft reads the partitions as they are, 0-element tensors
        ungathered = get_peft_model_state_dict(model)
        report["ungathered_shapes"] = sorted({str(tuple(t.shape)) for t in ungathered.values()})
        model.save_pretrained(out / "ungathered")
    probe = collate([train[i] for i in range(4)])
    model.eval()
    with torch.no_grad():  # a ZeRO-3 forward is collective: every rank runs it
        logits = model(input_ids=probe["input_ids"].to(args.device),
                       attention_mask=probe["attention_mask"].to(args.device)).logits.float().cpu()  # (B, T, V)
    if saves:
        trainer.save_model(str(out / "save_model"))  # collective
        full = trainer.model_wrapped._zero3_consolidated_16bit_state_dict()  # collective; the FULL model, rank 0
        if rank == 0:
            report["consolidated_keys"] = len(full)
            model.save_pretrained(out / "consolidated", state_dict=full)
        save_adapter(trainer, out / "gathered", bias=bias)  # collective
        state = get_peft_state_maybe_zero_3(model.named_parameters(), bias)  # collective: one gather for all
        params = dict(model.named_parameters())
        singles = {name: maybe_zero_3(params[name]) for name in state}  # collective: one gather per tensor
        report["maybe_zero_3_equals_one_gather"] = all(
            t.numel() > 0 and torch.equal(t, singles[name]) for name, t in state.items())
        report["zero3_enabled_after_training"] = is_deepspeed_zero3_enabled()
        again, _ = load_base("tiny")  # the trap: this process still loads under zero.Init
        report["reload_same_process_shape"] = list(again.model.embed_tokens.weight.shape)
        unset_hf_deepspeed_config()
        plain, _ = load_base("tiny")
        report["reload_after_unset_shape"] = list(plain.model.embed_tokens.weight.shape)
    if rank == 0:
        torch.save({"input_ids": probe["input_ids"], "attention_mask": probe["attention_mask"], "logits": logits},
                   out / "logits.pt")
        (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def main(argv: list[str] | None = None) -> int:
    """The command line: `python -m lorakit.zero3_demo --out DIR [--steps N ...]`, one rank or under torchrun."""
    parser = argparse.ArgumentParser(prog="python -m lorakit.zero3_demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--config", type=Path, default=CONFIGS / "zero3.json", help="DeepSpeed JSON config")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8, help="per rank")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--bias", choices=bias_modes(), default="none")
    parser.add_argument("--persistence-threshold", type=int, default=0,
                        help="stage3_param_persistence_threshold; -1 keeps the config's value")
    parser.add_argument("--no-saves", action="store_true", help="train and report the partition only")
    args = parser.parse_args(argv)
    if not args.config.is_file():
        parser.error(f"--config {args.config}: no such file; the DeepSpeed configs are in {CONFIGS}")
    demo(args.out, args.config, args.steps, args.batch_size, args.lr, args.bias,
         None if args.persistence_threshold < 0 else args.persistence_threshold, saves=not args.no_saves)
    return 0


if __name__ == "__main__":
    sys.exit(main())
