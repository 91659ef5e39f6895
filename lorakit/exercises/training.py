"""Checks for notebooks 05 (Trainer run) and 06 (ZeRO-3): two "your turn" cells each."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from lorakit.exercises.common import attempt, compare_tensors, conclude, run_cases

# ---- 05 Trainer run ----

def check_last_checkpoint(fn: Callable) -> bool:
    """Notebook 05: fn(output_dir) -> the checkpoint-N folder to resume from (largest N), or None when there is none.

    The oracle is transformers.trainer_utils.get_last_checkpoint on folders built for the case: none, a few, the
    "checkpoint-9 vs checkpoint-10" ordering trap, and a file or a non-numeric folder that only looks like one.
    """
    import os
    import tempfile
    from pathlib import Path

    from transformers.trainer_utils import get_last_checkpoint

    cases = {"no checkpoint": ([], []), "two checkpoints": (["checkpoint-2", "checkpoint-4"], []),
             "checkpoint-9 and checkpoint-10": (["checkpoint-9", "checkpoint-10"], []),
             "look-alikes": (["checkpoint-3", "checkpoint-final", "runs"], ["checkpoint-99"])}

    def judge(case: tuple[list[str], list[str]]) -> tuple[str | None, str]:
        folders, files = case
        with tempfile.TemporaryDirectory() as root:
            for folder in folders:
                (Path(root) / folder).mkdir()
            for file in files:
                (Path(root) / file).write_text("not a checkpoint")
            expected = get_last_checkpoint(root)
            got, error = attempt(fn, root)
        name = expected and Path(expected).name
        if error is None and not (got is None or isinstance(got, str | os.PathLike)):
            error = f"expected the path of a checkpoint-N folder (a str or Path) or None, got {type(got).__name__}"
        elif error is None and got is not expected and (got is None or expected is None or Path(got) != Path(expected)):
            got_name = None if got is None else Path(got).name or repr(os.fspath(got))
            error = (f"expected {name}, got {got_name}" if got_name != name else
                     f"expected {name} inside output_dir, got {os.fspath(got)!r}: join output_dir and the folder name")
        return error, f"{name}"

    ok, details = run_cases(cases.items(), judge)
    return conclude(ok, details, "you pick the checkpoint the Trainer would resume from",
                    "not the checkpoint the Trainer would pick",
                    "hint: keep the folders (not files) named checkpoint-<digits>, compare their N as int, not as "
                    "text, and return the path of the largest, or None")


def _int_list(x: object) -> list[int] | None:
    """A list of ints from a list, tuple or 1-D tensor; None for anything else."""
    if isinstance(x, torch.Tensor) and x.dim() == 1:
        return x.tolist()
    if isinstance(x, list | tuple) and all(isinstance(v, int) for v in x):
        return list(x)
    return None


def check_label_conversation(fn: Callable) -> bool:
    """Notebook 05 (harder): fn(tokenizer, messages) -> (input_ids, labels) of a whole chat: labels equal the token id
    on every assistant reply (with the end-of-sequence token that closes it) and -100 everywhere else, so the loss
    only teaches the replies, in every turn.

    The oracle is lorakit.data.tokenize_conversation, which produced the batches of this notebook's Trainer run.
    """
    from lorakit.data import IGNORE_INDEX, tokenize_conversation
    from lorakit.models import load_base

    _, tokenizer = load_base("tiny")
    cases = {"one exchange": [("user", "reverse: abc"), ("assistant", "cba")],
             "two exchanges": [("user", "upper: kiwi"), ("assistant", "KIWI"), ("user", "first: kiwi"),
                               ("assistant", "k")],
             "a system turn first": [("system", "be brief"), ("user", "add: 2+3"), ("assistant", "5")]}

    def judge(turns: list[tuple[str, str]]) -> tuple[str | None, str]:
        messages = [{"role": role, "content": text} for role, text in turns]
        expected_ids, expected_labels, _ = tokenize_conversation(tokenizer, messages, max_length=10_000)
        got, error = attempt(fn, tokenizer, [dict(m) for m in messages])
        ids, labels = (_int_list(x) for x in got) if isinstance(got, tuple | list) and len(got) == 2 else (None, None)
        if error is None and (ids is None or labels is None):
            error = f"expected a tuple (input_ids, labels) of two lists of ints, got {got!r:.60}"
        if error is None:
            if ids != expected_ids:
                error = (f"input_ids should be the {len(expected_ids)} tokens of apply_chat_template(messages, "
                         f"tokenize=False); got {len(ids)} tokens")
            elif len(labels) != len(ids):
                error = f"labels needs one entry per token: expected {len(ids)}, got {len(labels)}"
            elif labels != expected_labels:
                i = next(i for i, (a, b) in enumerate(zip(labels, expected_labels, strict=True)) if a != b)
                error = (f"label {i} (token {tokenizer.convert_ids_to_tokens(ids[i])!r}): expected "
                         f"{expected_labels[i]}, got {labels[i]}")
        learned = sum(label != IGNORE_INDEX for label in expected_labels)
        return error, f"{learned} of {len(expected_ids)} tokens carry a label"

    ok, details = run_cases(cases.items(), judge)
    return conclude(ok, details, "your labels match lorakit.data, turn by turn",
                    "your labels differ from lorakit.data",
                    "hint: for assistant turn k, the prompt is apply_chat_template(messages[:k], "
                    "add_generation_prompt=True, tokenize=False); the reply is what messages[:k + 1] adds to it")

# ---- 06 ZeRO-3 ----

def check_adapter_names(fn: Callable) -> bool:
    """Notebook 06: fn(named_params, bias) -> the parameter names an adapter save must gather, for each bias mode
    (none, all, lora_only).

    The oracle is peft itself: on a small Llama with attention biases and LoRA on q_proj/v_proj, the expected names
    are exactly the parameters peft made trainable for that bias mode.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    short = lambda names: ", ".join(sorted(n.split("self_attn.")[-1] for n in names)[:3])  # noqa: E731

    def judge(bias: str) -> tuple[str | None, str]:
        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, attention_bias=True))
        model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], bias=bias))
        expected = {n for n, p in model.named_parameters() if p.requires_grad}
        got, error = attempt(fn, model.named_parameters(), bias)
        if error is None and (isinstance(got, str) or not isinstance(got, Iterable)):
            error = f"expected a list of parameter names, got {type(got).__name__}"
        if error is None:
            got, error = attempt(list, got)  # a generator runs the learner's code only now
        if error is None and not all(isinstance(n, str) for n in got):
            error = f"expected a list of parameter names (str), got {got!r:.60}"
        if error:
            return error, ""
        missing, extra = expected - set(got), set(got) - expected
        problems = ([f"missing {len(missing)}, e.g. {short(missing)}"] if missing else []) + (
            [f"{len(extra)} too many, e.g. {short(extra)}"] if extra else [])
        return "; ".join(problems) or None, f"the {len(expected)} tensors peft trains"

    ok, details = run_cases(((f"bias={bias!r}", bias) for bias in ("none", "all", "lora_only")), judge)
    return conclude(ok, details, "adapter names match peft for every bias mode",
                    "adapter names differ from peft",
                    "hint: current peft keeps a wrapped layer's bias at <layer>.base_layer.bias")


def _deepspeed_partition_numel(numel: int, world_size: int) -> int:
    """Elements per rank, from DeepSpeed's own arithmetic (Init._aligned_size and _padding_size), called with a
    stand-in for the Init object: the real one needs a process group."""
    import logging
    from functools import partial
    from types import SimpleNamespace

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # DeepSpeed logs its accelerator choice while it imports
    try:
        from deepspeed.runtime.zero.partition_parameters import Init
    finally:
        logging.disable(previous)
    init = SimpleNamespace(_partition_world_size=lambda param: world_size)
    init._padding_size = partial(Init._padding_size, init)
    return Init._aligned_size(init, SimpleNamespace(ds_numel=numel)) // world_size


def check_zero3_shard(fn: Callable) -> bool:
    """Notebook 06 (harder): fn(param, rank, world_size) -> the 1-D tensor that ZeRO-3 rank `rank` keeps of `param`
    (its p.ds_tensor). DeepSpeed flattens the parameter, pads it to a multiple of the world size and gives rank r the
    elements [r·s, (r + 1)·s), with s = padded numel / world_size; the values of the padding are never read.

    The expected sizes come from DeepSpeed (deepspeed.runtime.zero.partition_parameters.Init); the slice is the one
    Init._partition_param copies into ds_tensor.
    """
    cases = [((64, 128), 2), ((5, 3), 4), ((3,), 4), ((7,), 3)]

    def judge(case: tuple[tuple[int, ...], int]) -> tuple[str | None, str]:
        shape, world_size = case
        param = torch.arange(1, torch.Size(shape).numel() + 1, dtype=torch.float32).reshape(shape)
        flat, size = param.reshape(-1), _deepspeed_partition_numel(param.numel(), world_size)
        for rank in range(world_size):
            got, error = attempt(fn, param.clone(), rank, world_size)
            if error is None and not isinstance(got, torch.Tensor):
                error = f"expected a tensor, got {type(got).__name__}"
            if error is None and got.shape != (size,):
                error = (f"rank {rank}: expected {size} element(s) (padded numel {size * world_size} / {world_size} "
                         f"ranks), got shape {tuple(got.shape)}")
            real = flat[rank * size:(rank + 1) * size]  # the elements that exist; the rest of the slice is padding
            error = error or compare_tensors(f"rank {rank}, its first {real.numel()} element(s)",
                                             got[:real.numel()], real, atol=0)
            if error:
                return error, ""
        padding = size * world_size - param.numel()
        return None, f"{size} element(s) per rank, {padding} padding element(s) at the end"

    ok, details = run_cases(((f"{shape} on {world_size} ranks", (shape, world_size))
                             for shape, world_size in cases), judge)
    return conclude(ok, details, "your shards are the ones DeepSpeed keeps",
                    "your shards differ from DeepSpeed's",
                    "hint: s = -(-numel // world_size) (ceil); pad the flattened parameter with zeros to "
                    "s * world_size elements, then take [rank * s, (rank + 1) * s)")
