"""The checks of the second exercises reject the typical mistake, and say what is wrong instead of raising.

tests/test_workshop.py proves that each notebook's reference solution passes and its stub fails; this table proves that
a plausible wrong answer fails too, with a verdict line that points at the mistake.

    .venv/bin/pytest tests/test_exercises.py
"""

import math
from pathlib import Path

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


def written_as_int(output_dir):  # a step number instead of a path
    return 4


def written_as_list(output_dir):  # every checkpoint instead of the last
    return sorted(str(p) for p in Path(output_dir).glob("checkpoint-*"))


def written_as_name(output_dir):  # the folder's name, without output_dir
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()]
    return max(found, key=lambda p: int(p.name[11:])).name if found else None


def written_as_text_order(output_dir):  # max() on the names: checkpoint-9 beats checkpoint-10
    found = [p for p in Path(output_dir).iterdir() if p.name.startswith("checkpoint-")]
    return str(max(found)) if found else None


@pytest.mark.parametrize(("wrong", "says"), [
    (written_as_int, "no checkpoint: expected the path of a checkpoint-N folder (a str or Path) or None, got int"),
    (written_as_list, "expected the path of a checkpoint-N folder (a str or Path) or None, got list"),
    (written_as_name, "two checkpoints: expected checkpoint-4 inside output_dir, got 'checkpoint-4'"),
    (written_as_text_order, "checkpoint-9 and checkpoint-10: expected checkpoint-10, got checkpoint-9"),
], ids=lambda value: value.__name__ if callable(value) else None)
def test_last_checkpoint_answers_any_return_value_with_a_verdict(wrong, says, capsys):
    assert exercises.check_last_checkpoint(wrong) is False
    out = capsys.readouterr().out
    assert out.startswith("❌ not the checkpoint the Trainer would pick") and says in out, out
    assert "hint: " in out.splitlines()[-1]


@pytest.mark.parametrize("wrong", [lambda named_params, bias: None, lambda named_params, bias: "lora_A",
                                   lambda named_params, bias: [1, 2]], ids=["None", "str", "ints"])
def test_adapter_names_answers_a_non_list_with_a_verdict(wrong, capsys):
    assert exercises.check_adapter_names(wrong) is False
    out = capsys.readouterr().out
    assert out.startswith("❌ ") and "expected a list of parameter names" in out, out


def test_is_lora_target_answers_an_ambiguous_truth_value_with_a_verdict(capsys):
    assert exercises.check_is_lora_target(lambda name, target_modules: torch.ones(2)) is False
    out = capsys.readouterr().out
    assert out.startswith("❌ ") and "expected True or False, got tensor" in out, out


def stub(*args):
    raise NotImplementedError("your turn: write this part, then run the cell again")


@pytest.mark.parametrize("check", ["check_online_softmax_step", "check_lora_parameter_count", "check_adapter_names"])
def test_a_stub_is_reported_once(check, capsys):
    assert getattr(exercises, check)(stub) is False
    out = capsys.readouterr().out
    assert out.startswith("❌ ") and out.count("not written yet") == 1, out


def test_run_cases_judges_each_case_and_stops_at_the_stub():
    def judge(case):
        return case, "right"

    ok, lines = exercises.run_cases([("a", None), ("b", "off by one"), ("c", None)], judge)
    assert (ok, lines) == (False, ["a: right", "b: off by one", "c: right"])
    assert exercises.run_cases([("a", None), ("b", None)], judge) == (True, ["a: right", "b: right"])
    unwritten = "not written yet: replace the `raise NotImplementedError` line with your code"
    assert exercises.run_cases([("a", unwritten), ("b", None)], judge) == (False, [f"a: {unwritten}"])
    assert exercises.run_cases([], judge) == (True, [])


def test_conclude_adds_the_hint_only_on_failure(capsys):
    assert exercises.conclude(True, ["a: right"], "passed", "failed", "hint: h") is True
    assert exercises.conclude(False, ["a: wrong"], "passed", "failed", "hint: h") is False
    assert capsys.readouterr().out == "✅ passed\n   a: right\n❌ failed\n   a: wrong\n   hint: h\n"
