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

import hashlib
import importlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import torch

if not torch.cuda.is_available():  # DeepSpeed warns "Setting accelerator to CPU" on every import unless told
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
# bitsandbytes (imported by peft) logs a line about an optional package on AVX512-BF16 CPUs: harmless, not actionable
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import transformers  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, Trainer  # noqa: E402
from transformers.integrations import is_deepspeed_zero3_enabled  # noqa: E402

from lorakit.args import DataArguments, LoraArguments, ModelArguments, TrainingArguments  # noqa: E402
from lorakit.data import DataError, make_supervised_data_module  # noqa: E402
from lorakit.runs import RunCallback, RunDirError, mark_finished, open_run  # noqa: E402

PROG = "lorakit-train"


class UsageError(ValueError):
    """A mistake in the command line or its files that the user can fix; main() prints it as one line."""


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


def required(module: str, flag: str):
    """Import lorakit.<module> for a feature the user asked for; a missing library is a usage error, not a fallback."""
    try:
        return importlib.import_module(f"lorakit.{module}")
    except ImportError as error:
        raise UsageError(f"{flag} needs lorakit.{module}, which cannot be imported ({error}); install the extra "
                         "(pip install -e '.[qlora,zero3]') or drop the flag") from None


class Parser(HfArgumentParser):
    """HfArgumentParser that reports a bad flag in one line instead of a 150-flag usage block."""

    def error(self, message: str):
        raise UsageError(f"{message}; see {PROG} --help")


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def check_deepspeed_config(path: str) -> dict:
    """The --deepspeed JSON as a dict, or a UsageError naming the file (and line) and the fix."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--deepspeed {path}: no such file; pass a DeepSpeed JSON config such as "
                         "lorakit/configs/zero3.json")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise UsageError(f"{path}:{error.lineno}: not valid JSON ({error.msg} at column {error.colno}); compare "
                         "with lorakit/configs/zero3.json") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path}: a DeepSpeed config is a JSON object {{...}}, got {type(config).__name__}")
    return config


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments, LoraArguments]:
    """The seed's HfArgumentParser over the four groups; under --deepspeed, the CPU process group comes first."""
    argv = sys.argv[1:] if argv is None else list(argv)
    deepspeed_config = _flag_value(argv, "--deepspeed")
    if deepspeed_config is not None:
        check_deepspeed_config(deepspeed_config)
        # DeepSpeed checks the world size while TrainingArguments is built: the process group must already exist
        try:
            required("zero3", "--deepspeed").maybe_init_cpu_distributed(deepspeed_config)
        except OSError as error:  # the rendezvous port is taken
            raise UsageError(str(error)) from None
    try:
        return Parser((ModelArguments, DataArguments, TrainingArguments, LoraArguments)).parse_args_into_dataclasses(
            args=argv)
    except UsageError:
        raise
    except ValueError as error:  # each dataclass's __post_init__ names the bad value and the fix
        message = " ".join(str(error).split())
        unknown = "Some specified arguments are not used by the HfArgumentParser: "
        if message.startswith(unknown):
            message = f"unrecognized arguments: {message[len(unknown):]}; see {PROG} --help"
        raise UsageError(message) from None


def compute_dtype(training_args: TrainingArguments) -> torch.dtype:
    return torch.float16 if training_args.fp16 else torch.bfloat16 if training_args.bf16 else torch.float32


def resolve_model(name_or_path: str) -> str:
    """A checkpoint directory for --model_name_or_path: a short name ('tiny'), a local directory, or a hub id."""
    from lorakit.models import MODELS, resolve

    path = Path(name_or_path).expanduser()
    if name_or_path in MODELS or path.is_dir():
        try:
            return str(resolve(name_or_path))
        except FileNotFoundError as error:
            raise UsageError(f"--model_name_or_path {error}") from None
    if "/" not in name_or_path or name_or_path.startswith((".", "/", "~")):
        raise UsageError(f"--model_name_or_path {name_or_path!r} is not a directory and not a known name "
                         f"({', '.join(MODELS)}); pass a local checkpoint directory")
    return name_or_path  # an org/name hub id: from_pretrained fetches it (or finds it in the cache)


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
        if lora_args.q_lora:
            if is_deepspeed_zero3_enabled():
                raise UsageError("--q_lora True with a ZeRO-3 DeepSpeed config: 4-bit weights cannot be partitioned "
                                 "this way; use a ZeRO-2 config (lorakit/configs/zero2.json) or torchrun for QLoRA")
            quant = required("quant", "--q_lora True")
            model = quant.load_in_4bit(model_args.model_name_or_path, dtype, double_quant=True, **kwargs)
            return quant.prepare_kbit(model, gradient_checkpointing=training_args.gradient_checkpointing)
        return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, dtype=dtype, **kwargs)
    except OSError as error:  # missing weights, unreachable hub id: transformers' own message says which file
        raise UsageError(f"--model_name_or_path {model_args.model_name_or_path}: {' '.join(str(error).split())} "
                         "Pass a checkpoint directory written by save_pretrained (config, weights, tokenizer).") from None


def lora_config(lora_args: LoraArguments) -> LoraConfig:
    """The seed's LoraConfig, field by field."""
    return LoraConfig(r=lora_args.lora_r, lora_alpha=lora_args.lora_alpha, target_modules=lora_args.lora_target_modules,
                      lora_dropout=lora_args.lora_dropout, bias=lora_args.lora_bias, task_type="CAUSAL_LM")


ADAPTABLE = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d)


def check_targets(model, targets: list[str]) -> None:
    """Every name must match a layer peft can adapt; peft raises only when *no* target matches, so a typo next to a
    valid name would silently train fewer layers, and a block name (mlp) fails deep inside peft."""
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    for target in targets:
        matched = [m for n, m in model.named_modules() if n == target or n.endswith("." + target)]
        if not matched:
            raise UsageError(f"--lora_target_modules {target!r} matches no module of {type(model).__name__}; its "
                             f"linear layers are {linear}")
        wrong = [m for m in matched if not (isinstance(m, ADAPTABLE) or type(m).__name__ == "Conv1D")]
        if wrong:
            raise UsageError(f"--lora_target_modules {target!r} names a {type(wrong[0]).__name__}, not a linear "
                             f"layer; LoRA adapts linear layers: {linear}")


def check_saved_adapter(lora_args: LoraArguments) -> None:
    """--lora_weight_path fixes the adapter's shape: refuse LoRA flags that ask for another one, say what it uses."""
    folder = Path(lora_args.lora_weight_path)
    if not any((folder / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise UsageError(f"--lora_weight_path {folder} has adapter_config.json but no adapter_model.safetensors; "
                         "pass a complete adapter directory written by save_pretrained / lorakit-train")
    saved = json.loads((folder / "adapter_config.json").read_text())
    defaults = LoraArguments()
    pairs = {"--lora_r": ("r", lora_args.lora_r, defaults.lora_r),
             "--lora_alpha": ("lora_alpha", lora_args.lora_alpha, defaults.lora_alpha),
             "--lora_dropout": ("lora_dropout", lora_args.lora_dropout, defaults.lora_dropout),
             "--lora_target_modules": ("target_modules", sorted(lora_args.lora_target_modules),
                                       sorted(defaults.lora_target_modules)),
             "--lora_bias": ("bias", lora_args.lora_bias, defaults.lora_bias)}
    used = {flag: sorted(saved.get(key) or []) if flag == "--lora_target_modules" else saved.get(key)
            for flag, (key, _, _) in pairs.items()}
    conflicts = [f"{flag} {now!r} (the adapter has {used[flag]!r})" for flag, (_, now, default) in pairs.items()
                 if now != default and now != used[flag]]
    if conflicts:
        raise UsageError(f"--lora_weight_path {folder} fixes the adapter's shape, but {', '.join(conflicts)}; drop "
                         "those flags, or leave --lora_weight_path empty to train a new adapter")
    say(f"continuing the adapter in {folder}: " + ", ".join(f"{flag} {used[flag]!r}" for flag in pairs))


def add_adapter(model, lora_args: LoraArguments):
    """get_peft_model with the seed's config, or the saved adapter of --lora_weight_path, trainable."""
    if lora_args.lora_weight_path:
        check_saved_adapter(lora_args)
        return PeftModel.from_pretrained(model, lora_args.lora_weight_path, is_trainable=True)
    check_targets(model, lora_args.lora_target_modules)
    return get_peft_model(model, lora_config(lora_args))


def trainable_parameters(model) -> str:
    trainable, total = model.get_nb_trainable_parameters()
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def save_adapter(trainer: Trainer, output_dir: str, bias: str) -> None:
    """The final adapter save: lorakit.zero3 gathers ZeRO-3 shards; without DeepSpeed, Trainer.save_model."""
    zero3 = optional("zero3", "saving with Trainer.save_model")
    if zero3 is not None:
        zero3.save_adapter(trainer, output_dir, bias=bias)
        if trainer.args.should_save:
            trainer.processing_class.save_pretrained(output_dir)
    else:
        trainer.save_model(output_dir)


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


def report_data(data_module: dict, training_args: TrainingArguments) -> None:
    """One line per thing in the data the run should know about (truncation, unknown characters, nothing to learn)."""
    describe = getattr(importlib.import_module("lorakit.data"), "data_report", None)
    for split in ("train_dataset", "eval_dataset"):
        dataset = data_module[split]
        if dataset is None:
            continue
        lines = describe(dataset) if describe else []
        if not describe and getattr(dataset, "truncated", 0):
            lines = [f"{dataset.truncated} of {len(dataset)} {split} records were longer than --model_max_length "
                     f"{training_args.model_max_length} and were truncated"]
        for line in lines:
            say(line)


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
    report_data(data_module, training_args)
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
    if training_args.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings would give checkpointed blocks no input gradient
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with gradient checkpointing
    keep, training_args.save_total_limit = training_args.save_total_limit, None  # transformers' rotation deletes
    trainer = Trainer(model=model, args=training_args, processing_class=tokenizer, **data_module)  # any checkpoint-*
    trainer.add_callback(RunCallback(run_dir, keep))
    trainer.train(resume_from_checkpoint=run_dir.resume_from)
    trainer.save_state()
    save_adapter(trainer, training_args.output_dir, lora_args.lora_bias)
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
            from lorakit.data import load_records
            from lorakit.evaluate import exact_match

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
