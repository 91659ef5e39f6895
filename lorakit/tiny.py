"""The embedded tiny model's recipe: its tokenizer, its config, and the deterministic pretraining that built data/tiny.

A 2-layer Llama (q_proj/k_proj/v_proj/o_proj, grouped-query attention, RMSNorm, SwiGLU, RoPE) with a character-level
tokenizer, genuinely pretrained on the synthetic chat skills of `lorakit.tasks`, so that fine-tuning adapts a model
that already knows something. Loading it is `lorakit.models.load_base("tiny")`; this module is how it was made.

Commands (the model registry's build command, lorakit.models, runs these):
    python -m lorakit.models build     # (make base) rebuild data/tiny: tokenizer + pretraining, ~6 min on 2 cores
    python -m lorakit.models task      # (make task) rebuild data/task/{train,eval}.jsonl

The recipe is an integration point: the corpus comes from lorakit.tasks, and every batch goes through lorakit.data's
prompt-masked encoder and collator, the same ones lorakit-train uses.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lorakit.data import DataCollator, tokenize_conversation
from lorakit.models import TASK_DIR, TINY_DIR
from lorakit.tasks import SKILLS, pretraining_pairs, reversal_task, write_jsonl

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


def encode_batch(tokenizer, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """One right-padded batch of single-turn exchanges, labels -100 on the prompt: only the answers are learned.

    Args:
        pairs: (question, answer) strings, B of them.
    Returns:
        input_ids, labels, attention_mask, each (B, T) with T the longest exchange in tokens.
    """
    examples = []
    for question, answer in pairs:
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        ids, labels, _ = tokenize_conversation(tokenizer, messages, tokenizer.model_max_length)  # ≤ 30 of 256 tokens
        examples.append({"input_ids": ids, "labels": labels})
    return DataCollator(tokenizer.pad_token_id)(examples)


def pretrain(model: LlamaForCausalLM, tokenizer, steps: int, batch_size: int, lr: float, warmup: int,
             weight_decay: float, seed: int, log_every: int = 50) -> list[dict]:
    """Train on the endless skill stream with AdamW, linear warm-up and cosine decay; returns the loss log.

    The learning rate at step s is lr · min((s + 1) / warmup, ½ (1 + cos(π s / steps))).
    """
    torch.manual_seed(seed)
    stream = pretraining_pairs(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * min(s, steps) / steps))))
    model.train()
    log, running, start = [], 0.0, time.perf_counter()
    for step in range(1, steps + 1):
        batch = encode_batch(tokenizer, [next(stream) for _ in range(batch_size)])  # (B, T) each
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
    """The fine-tuning task files: data/task/train.jsonl and eval.jsonl from lorakit.tasks.reversal_task()."""
    train, held_out = reversal_task()
    write_jsonl(train, out_dir / "train.jsonl")
    write_jsonl(held_out, out_dir / "eval.jsonl")
    print(f"wrote {out_dir}/train.jsonl ({len(train)}) and eval.jsonl ({len(held_out)})")
    return out_dir
