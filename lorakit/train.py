"""lorakit-train: the seed script (FastChat train_lora.py), step by step, on today's libraries and with its bugs fixed.

    lorakit-train --output_dir runs/x                      # the embedded tiny model on the reversal task, CPU, < 1 min
    python -m lorakit.train --output_dir runs/x --learning_rate 1e-3 --lora_r 16
    torchrun --nproc_per_node 2 -m lorakit.train --output_dir runs/x
    accelerate launch --multi_gpu --num_processes 2 -m lorakit.train --output_dir runs/x   (--multi_gpu: also on CPUs)
    torchrun --nproc_per_node 2 -m lorakit.train --output_dir runs/x --deepspeed lorakit/configs/zero3.json

Every flag is in lorakit.args (`lorakit-train --help`). Fixed against the seed: processing_class instead of
Trainer(tokenizer=); transformers.integrations instead of `from transformers import deepspeed`; a pad token without the
unk hack; trainable parameters printed on rank 0 in every mode; the adapter saved so that stock
PeftModel.from_pretrained reloads it (under ZeRO-3 too); QLoRA under ZeRO-3 the way peft documents it today
(4-bit codes stored in the compute dtype, no k-bit preparation) instead of warned about and broken;
--flash_attn through transformers' attention interface instead of a Llama-only monkey patch; lora_weight_path honoured.
Added: a mistake ends in one line and exit code 2 (lorakit.preflight, lorakit.data, lorakit.runs); a killed run
resumes from its newest *complete* checkpoint, and a directory it did not write is never touched (lorakit.runs).
--flash_attn falls back to the closest kernel with one line; a feature asked for that cannot load (--q_lora without
bitsandbytes, --deepspeed without deepspeed) is an error, never a silent fall-back.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings

import torch

if not torch.cuda.is_available():  # DeepSpeed warns "Setting accelerator to CPU" on every import unless told
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
# bitsandbytes (imported by peft) logs a line about an optional package on AVX512-BF16 CPUs: harmless, not actionable
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import transformers  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer  # noqa: E402
from transformers.integrations import is_deepspeed_zero3_enabled  # noqa: E402

from lorakit.args import DataArguments, LoraArguments, ModelArguments, TrainingArguments, result_settings  # noqa: E402
from lorakit.data import DataError, data_report, load_records, make_supervised_data_module  # noqa: E402
from lorakit.evaluate import exact_match  # noqa: E402
from lorakit.preflight import (  # noqa: E402
    PROG,
    UsageError,
    check_saved_adapter,
    check_targets,
    parse_args,
    required,
    resolve_model,
)
from lorakit.runs import RunCallback, RunDirError, mark_finished, open_run  # noqa: E402
from lorakit.zero3 import save_adapter  # noqa: E402


def rank0_print(*args) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, flush=True)


def say(message: str) -> None:
    rank0_print(f"[{PROG}] {message}")


def optional(module: str, purpose: str):
    """Import lorakit.<module>, or say in one line what is skipped and return None (only for a missing library)."""
    try:
        return importlib.import_module(f"lorakit.{module}")
    except ImportError as error:  # a bug inside the module is not "unavailable": it must show its traceback
        say(f"lorakit.{module} unavailable ({error}); {purpose}")
        return None


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
                say(message)
    try:
        if lora_args.q_lora and is_deepspeed_zero3_enabled():
            # FastChat (2023): "ZeRO3 is not currently supported with QLoRA". Today's way (peft's DeepSpeed guide):
            # store the packed 4-bit codes in the compute dtype so ZeRO-3 partitions them like any other tensor, and
            # skip k-bit preparation, which would re-cast parameters the engine owns.
            say(f"QLoRA under ZeRO-3: 4-bit codes stored as {dtype} (bnb_4bit_quant_storage) so DeepSpeed can "
                "partition them; k-bit preparation skipped")
            quant = required("quant", "--q_lora True")
            model = quant.load_in_4bit(model_args.model_name_or_path, dtype, double_quant=True, quant_storage=dtype,
                                       **kwargs)
            for parameter in model.parameters():
                parameter.requires_grad_(False)
            return model
        if lora_args.q_lora:
            quant = required("quant", "--q_lora True")
            model = quant.load_in_4bit(model_args.model_name_or_path, dtype, double_quant=True, **kwargs)
            return quant.prepare_kbit(model, gradient_checkpointing=training_args.activation_checkpointing)
        return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, dtype=dtype, **kwargs)
    except OSError as error:  # missing weights, unreachable hub id: transformers' own message says which file
        raise UsageError(f"--model_name_or_path {model_args.model_name_or_path}: {' '.join(str(error).split())} "
                         "Pass a checkpoint directory written by save_pretrained (config, weights, tokenizer).") from None


def lora_config(lora_args: LoraArguments) -> LoraConfig:
    """The seed's LoraConfig, field by field."""
    return LoraConfig(r=lora_args.lora_r, lora_alpha=lora_args.lora_alpha, target_modules=lora_args.lora_target_modules,
                      lora_dropout=lora_args.lora_dropout, bias=lora_args.lora_bias, task_type="CAUSAL_LM")


def add_adapter(model, lora_args: LoraArguments):
    """get_peft_model with the seed's config, or the saved adapter of --lora_weight_path, trainable."""
    if lora_args.lora_weight_path:
        say(check_saved_adapter(lora_args))
        return PeftModel.from_pretrained(model, lora_args.lora_weight_path, is_trainable=True)
    check_targets(model, lora_args.lora_target_modules)
    return get_peft_model(model, lora_config(lora_args))


def trainable_parameters(model) -> str:
    trainable, total = model.get_nb_trainable_parameters()
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def open_run_everywhere(training_args: TrainingArguments, settings: dict):
    """Rank 0 decides what the output directory allows (lorakit.runs.open_run); every rank gets the same answer."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    answer = [None]
    if training_args.process_index == 0:
        try:
            answer[0] = open_run(training_args.output_dir, settings, overwrite=training_args.overwrite_output_dir)
        except RunDirError as error:
            answer[0] = error
    if distributed:
        torch.distributed.broadcast_object_list(answer, src=0)
    if isinstance(answer[0], Exception):
        raise answer[0]
    return answer[0]


def run(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments,
        lora_args: LoraArguments) -> Trainer:
    """The whole pipeline on parsed arguments; returns the Trainer (its model holds the trained adapter)."""
    model_args.model_name_or_path = resolve_model(model_args.model_name_or_path)
    transformers.utils.logging.disable_progress_bar()
    # peft/transformers deprecation chatter about each other's internals is not actionable for a user of this script
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, cache_dir=training_args.cache_dir,
                                                  model_max_length=training_args.model_max_length, padding_side="right")
    except (OSError, ValueError) as error:  # no tokenizer files, or ones transformers cannot read
        raise UsageError(f"--model_name_or_path {model_args.model_name_or_path}: no usable tokenizer ("
                         f"{' '.join(str(error).split())[:200]}); the directory needs the tokenizer files that "
                         "save_pretrained writes (tokenizer.json, tokenizer_config.json)") from None
    data_module = make_supervised_data_module(tokenizer, data_args)  # bad data fails before any model is loaded
    for line in [line for split in ("train_dataset", "eval_dataset") if data_module[split] is not None
                 for line in data_report(data_module[split])]:
        say(line)  # truncation, characters the tokenizer cannot spell, records with nothing left to learn
    run_dir = open_run_everywhere(training_args, result_settings(model_args, data_args, training_args, lora_args))
    for skipped in run_dir.skipped:
        say(f"not resuming from {skipped}")
    if run_dir.resume_from:
        finished = run_dir.resume_from.endswith(f"checkpoint-{run_dir.finished_step}")
        say(f"resuming from {run_dir.resume_from}" + (" (the run had finished: nothing left to train)" * finished))

    torch.manual_seed(training_args.seed)  # adapter initialisation (A is random) is reproducible from --seed
    model = load_model(model_args, training_args, lora_args)
    model = add_adapter(model, lora_args)
    if training_args.flash_attn and model.config._attn_implementation == "flash_attention_2":
        importlib.import_module("lorakit.attention").cast_for_flash_attention(model, compute_dtype(training_args))
    if training_args.process_index == 0:  # the seed printed this only under DeepSpeed
        print(trainable_parameters(model), flush=True)
    if training_args.activation_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings would give checkpointed blocks no input gradient
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with gradient checkpointing
    if training_args.activation_checkpointing and is_deepspeed_zero3_enabled() and \
            not training_args.activation_checkpointing_kwargs:
        # transformers 5 recomputes non-reentrantly by default; under ZeRO-3 the frozen weights are re-partitioned
        # (shape (0,)) by the time of the recompute and torch refuses the mismatch (transformers#47254)
        training_args.activation_checkpointing_kwargs = {"use_reentrant": True}
        say("gradient checkpointing under ZeRO-3 with frozen base weights: use_reentrant=True")
    keep, training_args.save_total_limit = training_args.save_total_limit, None  # transformers' rotation deletes
    trainer = Trainer(model=model, args=training_args, processing_class=tokenizer, **data_module)  # any checkpoint-*
    trainer.add_callback(RunCallback(run_dir, keep))
    trainer.train(resume_from_checkpoint=run_dir.resume_from)
    trainer.save_state()
    save_adapter(trainer, training_args.output_dir, bias=lora_args.lora_bias)  # gathers ZeRO-3 shards, refuses
    if training_args.should_save:  # 0-element tensors; the tokenizer goes beside the adapter, as the seed did
        tokenizer.save_pretrained(training_args.output_dir)
    if training_args.process_index == 0:
        mark_finished(run_dir, trainer.state.global_step)
    model.config.use_cache = True
    return trainer


def train(argv: list[str] | None = None) -> Trainer:
    """Run the whole pipeline with command-line style arguments; returns the Trainer (its model holds the adapter)."""
    return run(*parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    """Console script `lorakit-train`: train, save, and on a single process report held-out exact match.

    A mistake it can explain (flags, data, files, output directory) ends in one line on stderr,
    `lorakit-train: error: ...`, and exit code 2; LORAKIT_DEBUG=1 shows the traceback instead.
    """
    try:
        model_args, data_args, training_args, lora_args = parse_args(argv)
        trainer = run(model_args, data_args, training_args, lora_args)
        if training_args.world_size == 1 and data_args.eval_data_path and not is_deepspeed_zero3_enabled():
            records = load_records(data_args.eval_data_path)
            accuracy = exact_match(trainer.model, trainer.processing_class, records)
            say(f"held-out exact match: {accuracy:.1%} ({data_args.eval_data_path})")
    except (UsageError, DataError, RunDirError) as error:
        if os.environ.get("LORAKIT_DEBUG"):
            raise
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
        return 2
    say(f"adapter saved in {training_args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
