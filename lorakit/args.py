"""The seed's four argument groups (FastChat train_lora.py), with help text, validation, and course defaults.

    from transformers import HfArgumentParser
    from lorakit.args import ModelArguments, DataArguments, TrainingArguments, LoraArguments
    model_args, data_args, training_args, lora_args = HfArgumentParser(
        (ModelArguments, DataArguments, TrainingArguments, LoraArguments)).parse_args_into_dataclasses()

Flag names and meanings are the seed's, so its launch scripts keep working. What differs:
- Defaults point at the embedded tiny model and the reversal task, so `lorakit-train --output_dir runs/x` is a complete
  run (50 epochs x 600 records / batch 16 = 1,900 steps, ~40 s on 2 cores). The seed's learning rate (2e-5) suits a 7B
  model; a model of 400k parameters with a rank-8 adapter needs about a hundred times more: on the tiny model 3e-3
  trained the task better than 1e-2 or 2e-3.
- Every bad value raises ValueError in __post_init__ (HfArgumentParser prints it) naming the value and the fix.
- The seed's unused `lora_weight_path` now does something: it starts training from a saved adapter.
"""

from __future__ import annotations

import hashlib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from peft import LoraConfig  # already loaded by transformers.TrainingArguments: no extra import time
from transformers.trainer_utils import SaveStrategy

# The course's data folder, for the defaults below. Its home is lorakit.models.DATA_DIR; this module copies out alone,
# and lorakit.models must not import this one (TrainingArguments imports peft and bitsandbytes: seconds, and a notice).
_DATA = Path(os.environ.get("LORAKIT_DATA", Path(__file__).resolve().parent.parent / "data"))
LORA_BIASES = typing.get_args(typing.get_type_hints(LoraConfig)["bias"])  # peft's own: ("none", "all", "lora_only")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default=str(_DATA / "tiny"), metadata={
        "help": "base model: a local checkpoint directory (config.json + weights + tokenizer) or a hub id; "
                "default: the embedded tiny Llama in data/tiny"})

    def __post_init__(self):
        if not str(self.model_name_or_path).strip():
            raise ValueError("--model_name_or_path is empty; pass a checkpoint directory (default: data/tiny)")


@dataclass
class DataArguments:
    data_path: str = field(default=str(_DATA / "task" / "train.jsonl"), metadata={
        "help": "training conversations, ShareGPT ('conversations') or 'messages' shape, one shape per file; .jsonl "
                "(one record per line) or .json (a list)"})
    eval_data_path: str = field(default=str(_DATA / "task" / "eval.jsonl"), metadata={
        "help": "held-out conversations: the exact match reported after a single-process run (not ZeRO-3), and the "
                "eval loss with --eval_strategy steps or epoch ('' for none)"})
    lazy_preprocess: bool = field(default=False, metadata={
        "help": "tokenise each record on first use instead of all up front (large data sets)"})

    def __post_init__(self):
        for flag, value in (("--data_path", self.data_path), ("--eval_data_path", self.eval_data_path)):
            if value and Path(value).suffix not in (".json", ".jsonl"):
                raise ValueError(f"{flag} {value!r} is neither .jsonl nor .json; convert it to conversation "
                                 "records, one per line in a .jsonl file")
        if not self.data_path:
            raise ValueError("--data_path is empty; pass a .jsonl file of conversation records")


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """transformers.TrainingArguments with the seed's extra fields and defaults for the embedded task."""

    cache_dir: str | None = field(default=None, metadata={"help": "where from_pretrained caches hub downloads"})
    optim: str = field(default="adamw_torch", metadata={"help": "optimizer (transformers' names): adamw_torch, ..."})
    model_max_length: int = field(default=512, metadata={
        "help": "maximum sequence length in tokens; longer conversations are truncated (and counted)"})
    flash_attn: bool = field(default=False, metadata={
        "help": "flash attention: flash_attention_2 on a GPU with flash-attn, else the closest available kernel"})
    # Course defaults for the embedded task (transformers' own defaults in brackets).
    learning_rate: float = field(default=3e-3, metadata={"help": "peak learning rate [5e-5; the seed used 2e-5]"})
    num_train_epochs: float = field(default=50.0, metadata={"help": "passes over the training data [3]"})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "batch size per process [8]"})
    warmup_steps: float = field(default=20, metadata={"help": "linear warm-up steps [0]"})
    logging_steps: float = field(default=10, metadata={"help": "log the training loss every N steps [500]"})
    save_strategy: SaveStrategy | str = field(default="epoch", metadata={"help": "when to write checkpoint-N/ [steps]"})
    save_total_limit: int | None = field(default=2, metadata={"help": "keep only the newest N checkpoints [all]"})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "loggers (tensorboard, wandb, ...)"})
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={
        "help": "DDP searches for parameters without gradient each step; LoRA has none [None: True for models]"})
    dataloader_pin_memory: bool = field(default=False, metadata={"help": "pin batches in page-locked memory (GPU only) [True]"})

    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "start a fresh run in an --output_dir that holds other files or another run's settings; files of the "
                "same name are overwritten, nothing else is deleted [refuse]"})

    def __post_init__(self):
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError(f"--num_train_epochs {self.num_train_epochs:g} trains no step; pass a positive number "
                             "(default 50) or --max_steps N")
        if (self.bf16 or self.fp16) and not torch.cuda.is_available():
            # transformers would raise "assign use_cpu"; mixed precision is a GPU feature in this course
            flag = "--bf16" if self.bf16 else "--fp16"
            if int(os.environ.get("RANK", 0)) == 0:
                print(f"[lorakit-train] {flag} True needs a CUDA GPU; none is visible, so training runs in fp32",
                      flush=True)
            self.bf16 = self.fp16 = False
        if self.gradient_checkpointing is not None:  # the seed's flag; transformers 5 renamed it and warns on the old
            self.activation_checkpointing, self.gradient_checkpointing = bool(self.gradient_checkpointing), None
        if self.model_max_length < 2:
            raise ValueError(f"--model_max_length {self.model_max_length} is too small: a prompt and a reply need at "
                             "least 2 tokens; the seed uses 512")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning_rate {self.learning_rate} must be > 0; try 3e-3 for the tiny model, 2e-4 "
                             "for a 7B model with LoRA")
        if not self.use_cpu and not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", 1)) > 1:
            # several CPU processes (torchrun, accelerate launch): without use_cpu, accelerate sets up no gloo process
            # group and every rank silently trains its own full copy on all the data
            self.use_cpu = True
        super().__post_init__()


@dataclass
class LoraArguments:
    lora_r: int = field(default=8, metadata={"help": "rank r of the update B A (r x d_in and d_out x r)"})
    lora_alpha: int = field(default=16, metadata={"help": "the update is scaled by lora_alpha / lora_r"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the adapter input during training, [0, 1)"})
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"], metadata={
        "help": "names (or name endings) of the linear layers that get an adapter"})
    lora_weight_path: str = field(default="", metadata={
        "help": "start from this saved adapter directory instead of a fresh one (the seed declared it but ignored it)"})
    lora_bias: str = field(default="none", metadata={
        "help": "which biases train and are saved: none, all, or lora_only (biases of adapted layers)"})
    q_lora: bool = field(default=False, metadata={"help": "QLoRA: load the base in 4-bit NF4 with double quantisation"})

    def __post_init__(self):
        if not isinstance(self.lora_r, int) or self.lora_r < 1:
            raise ValueError(f"--lora_r {self.lora_r!r} must be a positive integer; usual values are 4 to 64 (seed: 8)")
        if self.lora_alpha <= 0:
            raise ValueError(f"--lora_alpha {self.lora_alpha!r} must be > 0; a common choice is 2 x lora_r (seed: 16)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora_dropout {self.lora_dropout!r} must be in [0, 1); the seed uses 0.05")
        if self.lora_bias not in LORA_BIASES:
            raise ValueError(f"--lora_bias {self.lora_bias!r} is not one of {', '.join(LORA_BIASES)}; use none "
                             "unless the base model's linear layers have biases you want to train")
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [self.lora_target_modules]
        if not self.lora_target_modules or not all(str(m).strip() for m in self.lora_target_modules):
            raise ValueError(f"--lora_target_modules {self.lora_target_modules!r} needs at least one non-empty layer "
                             "name, e.g. --lora_target_modules q_proj v_proj")
        if self.lora_weight_path and not (Path(self.lora_weight_path) / "adapter_config.json").is_file():
            raise ValueError(f"--lora_weight_path {self.lora_weight_path!r} holds no adapter_config.json; pass a "
                             "directory written by save_pretrained / lorakit-train, or leave it empty")


RESULT_FLAGS = {  # the settings that decide a run's result: resuming with any other value would mix two runs
    "model": ("model_name_or_path",), "data": ("data_path", "model_max_length", "lazy_preprocess"),
    "training": ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps", "weight_decay", "optim", "seed",
                 "data_seed", "fp16", "bf16", "world_size"),
    "lora": ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_bias", "lora_weight_path",
             "q_lora")}


def _file_hash(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path and Path(path).is_file() else ""


def result_settings(model_args, data_args, training_args, lora_args) -> dict:
    """flag → value for every RESULT_FLAGS setting, plus the content hashes of the data and DeepSpeed config."""
    groups = {"model": model_args, "data": [data_args, training_args], "training": training_args, "lora": lora_args}
    settings = {}
    for group, names in RESULT_FLAGS.items():
        sources = groups[group] if isinstance(groups[group], list) else [groups[group]]
        for name in names:
            source = next(s for s in sources if hasattr(s, name))
            value = getattr(source, name)
            settings[f"--{name}"] = sorted(value) if isinstance(value, list) else str(value) if isinstance(
                value, Path) else getattr(value, "value", value)
    settings["data sha256"] = _file_hash(data_args.data_path)
    deepspeed = training_args.deepspeed
    settings["--deepspeed sha256"] = _file_hash(deepspeed) if isinstance(deepspeed, str) else str(deepspeed or "")
    return settings
