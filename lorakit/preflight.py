"""Preflight for lorakit-train: everything on the command line is checked before any work starts.

    from lorakit.preflight import UsageError, parse_args
    model_args, data_args, training_args, lora_args = parse_args(["--output_dir", "runs/x", "--lora_r", "16"])

A mistake a user can fix (a bad flag, a missing model or adapter file, a DeepSpeed JSON with a syntax error, a LoRA
target that is not a linear layer) raises UsageError with one sentence naming the problem and the fix;
`lorakit-train` prints it as `lorakit-train: error: ...` with exit code 2. The checks of the data itself live in
lorakit.data (DataError, with file:line), those of the output directory in lorakit.runs (RunDirError).
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch
from transformers import HfArgumentParser

from lorakit.args import DataArguments, LoraArguments, ModelArguments, TrainingArguments

PROG = "lorakit-train"


class UsageError(ValueError):
    """A mistake in the command line or its files that the user can fix; main() prints it as one line."""


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


def flag_value(argv: list[str], flag: str) -> str | None:
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
    deepspeed_config = flag_value(argv, "--deepspeed")
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


ADAPTABLE = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d)


def check_targets(model, targets: list[str]) -> None:
    """Every name must match a layer peft can adapt; peft raises only when *no* target matches, so a typo next to a
    valid name would silently train fewer layers, and a block name (mlp) fails deep inside peft."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists  # peft's own matching rule, not a copy of it

    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    for target in targets:
        config = LoraConfig(target_modules=[target])
        matched = [m for n, m in model.named_modules() if check_target_module_exists(config, n)]
        if not matched:
            raise UsageError(f"--lora_target_modules {target!r} matches no module of {type(model).__name__}; its "
                             f"linear layers are {linear}")
        wrong = [m for m in matched if not (isinstance(m, ADAPTABLE) or type(m).__name__ == "Conv1D")]
        if wrong:
            raise UsageError(f"--lora_target_modules {target!r} names a {type(wrong[0]).__name__}, not a linear "
                             f"layer; LoRA adapts linear layers: {linear}")


def check_saved_adapter(lora_args: LoraArguments) -> str:
    """--lora_weight_path fixes the adapter's shape: refuse LoRA flags that ask for another one; returns what it uses."""
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
    return f"continuing the adapter in {folder}: " + ", ".join(f"{flag} {used[flag]!r}" for flag in pairs)
