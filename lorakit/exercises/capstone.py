"""Checks for notebook 07 (capstone): a lorakit-train command line, then a merge done by hand."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lorakit.exercises.common import attempt, compare_tensors, conclude, run_cases


def _parse_train_flags(argv: list[str]):
    """(model, data, training, lora arguments, left-over strings) as lorakit-train parses argv; raises ValueError with
    the parser's own message when it refuses them."""
    import contextlib
    import io

    from transformers import HfArgumentParser

    from lorakit.args import DataArguments, LoraArguments, ModelArguments, TrainingArguments

    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, LoraArguments))
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except SystemExit:  # argparse reports a bad value by printing usage and exiting
        lines = stderr.getvalue().strip().splitlines() or ["argparse refused the flags"]
        raise ValueError(lines[-1].split("error: ", 1)[-1]) from None


def check_train_flags(fn: Callable) -> bool:
    """Notebook 07 (warm-up): fn(output_dir, r, alpha, target_modules, q_lora) -> the list of command-line flags
    (sys.argv[1:]) that make lorakit-train write to output_dir with that LoRA.

    The oracle is lorakit-train's own parser, HfArgumentParser over the four dataclasses of lorakit.args (the seed's
    parser): every value must come back as asked, and nothing may be left over.
    """
    cases = [("runs/seed", 8, 16, ["q_proj", "v_proj"], False),
             ("runs/attention", 16, 32, ["q_proj", "k_proj", "v_proj", "o_proj"], True),
             ("runs/mlp", 4, 8, ["down_proj"], False)]

    def judge(case: tuple[str, int, int, list[str], bool]) -> tuple[str | None, str]:
        output_dir, r, alpha, targets, q_lora = case
        got, error = attempt(fn, output_dir, r, alpha, list(targets), q_lora)
        if error is None and not (isinstance(got, list) and all(isinstance(a, str) for a in got)):
            error = f"expected a list of strings like sys.argv[1:], got {got!r:.60}"
        if error is None:
            try:
                _, _, training, lora, extra = _parse_train_flags(got)
            except Exception as refusal:  # the parser's message (bad value, __post_init__ validation) is the verdict
                error = f"lorakit-train refuses these flags: {str(refusal)[:120]}"
        if error is None:
            parsed = {"--output_dir": training.output_dir, "--lora_r": lora.lora_r, "--lora_alpha": lora.lora_alpha,
                      "--lora_target_modules": lora.lora_target_modules, "--q_lora": lora.q_lora}
            asked = {"--output_dir": output_dir, "--lora_r": r, "--lora_alpha": alpha,
                     "--lora_target_modules": targets, "--q_lora": q_lora}
            wrong = [f"{flag} parsed as {parsed[flag]!r}, expected {value!r}" for flag, value in asked.items()
                     if parsed[flag] != value]
            if extra:
                error = f"not lorakit-train flags, left over by the parser: {extra}"
            elif wrong:
                error = wrong[0] + (" (a flag you leave out keeps its default)" if len(wrong) == 1 else
                                    f", and {len(wrong) - 1} more")
        return error, (f"parsed back exactly ({len(got)} strings)" if error is None else "")

    ok, details = run_cases(((f"r={r}, alpha={alpha}, {'+'.join(t.replace('_proj', '') for t in targets)}"
                              f"{', QLoRA' if q_lora else ''}", (output_dir, r, alpha, targets, q_lora))
                             for output_dir, r, alpha, targets, q_lora in cases), judge)
    return conclude(ok, details, "lorakit-train parses your flags as intended",
                    "lorakit-train reads something else",
                    "hint: flags are the dataclass field names: --lora_r 8; a list takes several values "
                    "(--lora_target_modules q_proj v_proj); a bool takes True or False; every value is a string")


def check_merge_adapter(fn: Callable) -> bool:
    """Notebook 07 (harder): fn(base_state, adapter_state, adapter_config) -> the merged state dict, from the files a
    LoRA run saves (adapter_model.safetensors, adapter_config.json) and the base model's own state dict:
    W = W0 + scaling · B A for every adapted weight, with scaling = lora_alpha / r, or lora_alpha / √r with rsLoRA.

    The oracle is peft: merge_and_unload() on the very model that saved the adapter, on a small random Llama.
    """
    import json
    import tempfile
    import warnings
    from pathlib import Path

    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    cases = [(4, 8, ["q_proj", "v_proj"], False), (2, 16, ["o_proj", "down_proj"], False),
             (8, 16, ["q_proj", "k_proj", "v_proj"], True)]

    def judge(case: tuple[int, int, list[str], bool]) -> tuple[str | None, str]:
        r, alpha, targets, rslora = case
        torch.manual_seed(r)
        base = LlamaForCausalLM(config)
        base_state = {k: v.clone() for k, v in base.state_dict().items()}
        with warnings.catch_warnings(), tempfile.TemporaryDirectory() as folder:
            warnings.simplefilter("ignore")  # peft warns that a random base has no config on the hub
            model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora))
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:  # as after training: B = 0 would make every merge trivially right
                        p.normal_(0, 0.5)
            model.save_pretrained(folder)
            adapter_state = load_file(Path(folder) / "adapter_model.safetensors")
            adapter_config = json.loads((Path(folder) / "adapter_config.json").read_text())
            expected = model.merge_and_unload().state_dict()
        got, error = attempt(fn, {k: v.clone() for k, v in base_state.items()}, dict(adapter_state), adapter_config)
        if error is None and not isinstance(got, dict):
            error = f"expected a dict of tensors (a state dict), got {type(got).__name__}"
        if error is None and got.keys() != expected.keys():
            missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
            error = (f"missing {len(missing)} key(s), e.g. {missing[0]}" if missing else
                     f"{len(extra)} key(s) the merged model does not have, e.g. {extra[0]}")
        for key in expected:  # stops comparing at the first difference
            error = error or compare_tensors(key, got[key], expected[key], atol=1e-5)
        changed = [k for k in expected if not torch.equal(expected[k], base_state[k])]
        return error, f"{len(changed)} weights merged, equal to peft's merge_and_unload()"

    ok, details = run_cases(((f"r={r}, alpha={alpha}, {'+'.join(t.replace('_proj', '') for t in targets)}"
                              f"{', rsLoRA' if rslora else ''}", (r, alpha, targets, rslora))
                             for r, alpha, targets, rslora in cases), judge)
    return conclude(ok, details, "your merge equals peft's merge_and_unload()",
                    "your merge differs from peft's",
                    'hint: an adapter key is "base_model.model." + <layer> + ".lora_A.weight"; the base key is '
                    '<layer> + ".weight"; read r, lora_alpha and use_rslora from adapter_config')
