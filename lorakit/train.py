"""lorakit-train: the seed script (FastChat train_lora.py), step by step, on today's libraries and with its bugs fixed.

    lorakit-train --output_dir runs/x                      # the embedded tiny model on the reversal task, CPU, < 1 min
    python -m lorakit.train --output_dir runs/x --learning_rate 1e-3 --lora_r 16
    torchrun --nproc_per_node 2 -m lorakit.train --output_dir runs/x
    accelerate launch --multi_gpu --num_processes 2 -m lorakit.train --output_dir runs/x   (--multi_gpu: also on CPUs)
    torchrun --nproc_per_node 2 -m lorakit.train --output_dir runs/x --deepspeed lorakit/configs/zero3.json

Every flag is in lorakit.args (`lorakit-train --help`). Fixed against the seed: processing_class instead of
Trainer(tokenizer=); transformers.integrations instead of `from transformers import deepspeed`; a pad token without the
unk hack; trainable parameters printed on rank 0 in every mode; resume from the newest checkpoint-N; the adapter saved
so that stock PeftModel.from_pretrained reloads it (under ZeRO-3 too); QLoRA refused under ZeRO-3 instead of warned
about; --flash_attn through transformers' attention interface instead of a Llama-only monkey patch; lora_weight_path
honoured. The optional pieces (lorakit.quant, lorakit.attention, lorakit.zero3) are imported when needed; a missing one
is reported in one line and the run continues without it.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, Trainer
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_utils import get_last_checkpoint

from lorakit.args import DataArguments, LoraArguments, ModelArguments, TrainingArguments
from lorakit.data import make_supervised_data_module


def rank0_print(*args) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, flush=True)


def optional(module: str, purpose: str):
    """Import lorakit.<module>, or print one line saying what is skipped and return None."""
    try:
        return importlib.import_module(f"lorakit.{module}")
    except Exception as error:  # any import failure of an optional piece must not stop the run
        rank0_print(f"[lorakit-train] lorakit.{module} unavailable ({type(error).__name__}: {error}); {purpose}")
        return None


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments, LoraArguments]:
    """The seed's HfArgumentParser over the four groups; under --deepspeed, the CPU process group comes first."""
    argv = sys.argv[1:] if argv is None else list(argv)
    deepspeed_config = _flag_value(argv, "--deepspeed")
    if deepspeed_config is not None:
        # DeepSpeed checks the world size while TrainingArguments is built: the process group must already exist
        zero3 = optional("zero3", "relying on the launcher for the distributed set-up")
        if zero3 is not None:
            zero3.maybe_init_cpu_distributed(deepspeed_config)
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, LoraArguments))
    return parser.parse_args_into_dataclasses(args=argv)


def compute_dtype(training_args: TrainingArguments) -> torch.dtype:
    return torch.float16 if training_args.fp16 else torch.bfloat16 if training_args.bf16 else torch.float32


def load_model(model_args: ModelArguments, training_args: TrainingArguments, lora_args: LoraArguments):
    """The base model: 4-bit under --q_lora (via lorakit.quant), with the attention kernel --flash_attn asks for."""
    dtype = compute_dtype(training_args)
    kwargs = {"cache_dir": training_args.cache_dir}
    if training_args.flash_attn:
        attention = optional("attention", "using transformers' default attention (sdpa)")
        if attention is not None:
            kwargs["attn_implementation"], message = attention.choose_attention(True)
            if message:
                rank0_print(f"[lorakit-train] {message}")
    zero3 = is_deepspeed_zero3_enabled()
    quant = optional("quant", "training the full-precision base instead of 4-bit") if lora_args.q_lora else None
    if quant is not None:
        if zero3:
            raise ValueError("--q_lora True with a ZeRO-3 DeepSpeed config: 4-bit weights cannot be partitioned this "
                             "way; use a ZeRO-2 config (lorakit/configs/zero2.json) or plain DDP (torchrun) for QLoRA")
        model = quant.load_in_4bit(model_args.model_name_or_path, dtype, double_quant=True, **kwargs)
        model = quant.prepare_kbit(model, gradient_checkpointing=training_args.gradient_checkpointing, zero3=zero3)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, dtype=dtype, **kwargs)
    return model


def lora_config(lora_args: LoraArguments) -> LoraConfig:
    """The seed's LoraConfig, field by field."""
    return LoraConfig(r=lora_args.lora_r, lora_alpha=lora_args.lora_alpha, target_modules=lora_args.lora_target_modules,
                      lora_dropout=lora_args.lora_dropout, bias=lora_args.lora_bias, task_type="CAUSAL_LM")


def add_adapter(model, lora_args: LoraArguments):
    """get_peft_model with the seed's config, or the saved adapter of --lora_weight_path, trainable."""
    if lora_args.lora_weight_path:
        return PeftModel.from_pretrained(model, lora_args.lora_weight_path, is_trainable=True)
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in lora_args.lora_target_modules
               if not any(n == t or n.endswith("." + t) for n, _ in model.named_modules())]
    if missing:
        # peft raises only when *no* target matches; a typo next to a valid name would silently train fewer layers
        raise ValueError(f"--lora_target_modules {missing} match no module of {type(model).__name__}; its linear "
                         f"layers are {sorted(names)}")
    return get_peft_model(model, lora_config(lora_args))


def trainable_parameters(model) -> str:
    trainable, total = model.get_nb_trainable_parameters()
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def save_adapter(trainer: Trainer, output_dir: str, bias: str) -> None:
    """The final adapter save: lorakit.zero3 gathers ZeRO-3 shards; without it, Trainer.save_model."""
    zero3 = optional("zero3", "saving with Trainer.save_model")
    if zero3 is not None:
        zero3.save_adapter(trainer, output_dir, bias=bias)
        if trainer.args.should_save:
            trainer.processing_class.save_pretrained(output_dir)
    else:
        trainer.save_model(output_dir)


def train(argv: list[str] | None = None) -> Trainer:
    """Run the whole pipeline with command-line style arguments; returns the Trainer (its model holds the adapter)."""
    model_args, data_args, training_args, lora_args = parse_args(argv)
    from lorakit.models import MODELS, resolve

    if model_args.model_name_or_path in MODELS:  # a short name such as "tiny"
        model_args.model_name_or_path = str(resolve(model_args.model_name_or_path))
    transformers.utils.logging.disable_progress_bar()
    # peft/transformers deprecation chatter about each other's internals is not actionable for a user of this script
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.manual_seed(training_args.seed)  # adapter initialisation (A is random) is reproducible from --seed

    model = load_model(model_args, training_args, lora_args)
    model = add_adapter(model, lora_args)
    if training_args.flash_attn and model.config._attn_implementation == "flash_attention_2":
        importlib.import_module("lorakit.attention").cast_for_flash_attention(model, compute_dtype(training_args))
    if training_args.process_index == 0:  # the seed printed this only under DeepSpeed
        print(trainable_parameters(model), flush=True)
    if training_args.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings would give checkpointed blocks no input gradient

    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, cache_dir=training_args.cache_dir,
                                              model_max_length=training_args.model_max_length, padding_side="right")
    data_module = make_supervised_data_module(tokenizer, data_args)
    for split in ("train_dataset", "eval_dataset"):
        dataset = data_module[split]
        if dataset is not None and getattr(dataset, "truncated", 0):
            rank0_print(f"[lorakit-train] {dataset.truncated} of {len(dataset)} {split} records were longer than "
                        f"--model_max_length {training_args.model_max_length} and were truncated")
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with gradient checkpointing
    trainer = Trainer(model=model, args=training_args, processing_class=tokenizer, **data_module)

    checkpoint = get_last_checkpoint(training_args.output_dir) if Path(training_args.output_dir).is_dir() else None
    if checkpoint:
        rank0_print(f"[lorakit-train] resuming from {checkpoint}")
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_state()
    save_adapter(trainer, training_args.output_dir, lora_args.lora_bias)
    model.config.use_cache = True
    return trainer


def main(argv: list[str] | None = None) -> int:
    """Console script `lorakit-train`: train, save, and on a single process report held-out exact match."""
    trainer = train(argv)
    args = trainer.args
    data_path = _flag_value(sys.argv[1:] if argv is None else list(argv), "--eval_data_path")
    data_path = DataArguments().eval_data_path if data_path is None else data_path
    if args.world_size == 1 and data_path and not is_deepspeed_zero3_enabled():
        from lorakit.data import load_records
        from lorakit.evaluate import exact_match

        accuracy = exact_match(trainer.model, trainer.processing_class, load_records(data_path))
        print(f"[lorakit-train] held-out exact match: {accuracy:.1%} ({data_path})", flush=True)
    rank0_print(f"[lorakit-train] adapter saved in {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
