"""The checks of the second exercises reject the typical mistake, and say what is wrong instead of raising.

tests/test_workshop.py proves that each notebook's reference solution passes and its stub fails; this table proves that
a plausible wrong answer fails too, with a verdict line that points at the mistake.

    .venv/bin/pytest tests/test_exercises.py
"""

import math

import pytest
import torch

from lorakit import exercises


def svd_without_scaling(delta, r, alpha):  # forgets the layer's alpha / r
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return Vh[:r], U[:, :r] * S[:r]


def one_absmax_for_all(w, blocksize):  # a per-tensor scale instead of one per block
    from lorakit.nf4 import NF4_CODEBOOK

    absmax = w.abs().max()
    return NF4_CODEBOOK[(w[:, None] / absmax - NF4_CODEBOOK).abs().argmin(dim=1)] * absmax


def causal_only(padding_mask):  # ignores the padding
    length = padding_mask.shape[1]
    return torch.ones(length, length, dtype=torch.bool).tril().expand(padding_mask.shape[0], 1, length, length)


def plain_suffix(name, target_modules):  # endswith without the dot, and a string taken as a list
    return any(name.endswith(target) for target in target_modules)


def everything_after_first_prompt(tokenizer, messages):  # learns the second user turn too
    ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    start = ids.index(tokenizer.convert_tokens_to_ids("<|assistant|>")) + 1
    return ids, [-100] * start + ids[start:]


def unpadded_shard(param, rank, world_size):  # the last rank comes up short
    size = -(-param.numel() // world_size)
    return param.reshape(-1)[rank * size:(rank + 1) * size]


def comma_separated_targets(output_dir, r, alpha, target_modules, q_lora):  # one string where the parser wants a list
    return ["--output_dir", output_dir, "--lora_r", str(r), "--lora_alpha", str(alpha),
            "--lora_target_modules", ",".join(target_modules), "--q_lora", str(q_lora)]


def merge_ignoring_rslora(base_state, adapter_state, adapter_config):  # always alpha / r
    merged = dict(base_state)
    for key, A in adapter_state.items():
        if ".lora_A." in key:
            layer = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            B = adapter_state[key.replace(".lora_A.", ".lora_B.")]
            merged[layer + ".weight"] = base_state[layer + ".weight"] + adapter_config["lora_alpha"] / adapter_config[
                "r"] * (B @ A)
    return merged


def merge_with_sqrt_always(base_state, adapter_state, adapter_config):  # the other way round
    config = dict(adapter_config, lora_alpha=adapter_config["lora_alpha"] * math.sqrt(adapter_config["r"]) /
                  adapter_config["r"])
    return merge_ignoring_rslora(base_state, adapter_state, config)


def crashes(*args):
    return {}["missing"]


@pytest.mark.parametrize(("check", "wrong", "says"), [
    ("check_lora_from_delta", svd_without_scaling, "(alpha / r) B A: values differ"),
    ("check_nf4_roundtrip", one_absmax_for_all, "dequantised weights: values differ"),
    ("check_attention_visibility", causal_only, "query 4, key 4: expected False, got True"),
    ("check_is_lora_target", plain_suffix, "names wrong, e.g. model.layers.0.self_attn.q_proj (peft leaves it alone)"),
    ("check_label_conversation", everything_after_first_prompt, "(token '<|user|>'): expected -100"),
    ("check_zero3_shard", unpadded_shard, "rank 3: expected 4 element(s)"),
    ("check_train_flags", comma_separated_targets, "--lora_target_modules parsed as ['q_proj,v_proj']"),
    ("check_merge_adapter", merge_ignoring_rslora, "rsLoRA: model.layers.0.self_attn.q_proj.weight: values differ"),
    ("check_merge_adapter", merge_with_sqrt_always, "r=4, alpha=8, q+v: model.layers.0.self_attn.q_proj.weight"),
    ("check_zero3_shard", crashes, "KeyError: 'missing'"),
], ids=lambda value: value if isinstance(value, str) and value.startswith("check_") else None)
def test_check_rejects_a_typical_mistake_with_a_verdict(check, wrong, says, capsys):
    assert getattr(exercises, check)(wrong) is False
    out = capsys.readouterr().out
    assert out.startswith("❌ ") and says in out, out
