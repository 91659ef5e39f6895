"""Checks for notebooks 03 (flash attention) and 04 (PEFT wrapping): two "your turn" cells each."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lorakit.exercises.common import attempt, compare_tensors, conclude, run_cases

# ---- 03 attention ----

def check_online_softmax_step(fn: Callable) -> bool:
    """Notebook 03: fn(m (R,), total (R,), acc (R, D), scores (R, bk), values (bk, D)) -> (m, total, acc) after one
    block of keys. Folded over the blocks from m=-inf, total=0, acc=0, acc/total must equal softmax(scores) @ values —
    also for scores near 1000, where exp() without the running max overflows.
    """

    def judge(shift: float) -> tuple[str | None, str]:
        gen = torch.Generator().manual_seed(3)
        scores = torch.randn(5, 12, generator=gen, dtype=torch.float64) * 3 + shift  # (R, Lk)
        values = torch.randn(12, 4, generator=gen, dtype=torch.float64)  # (Lk, D)
        state = (torch.full((5,), float("-inf"), dtype=torch.float64), torch.zeros(5, dtype=torch.float64),
                 torch.zeros(5, 4, dtype=torch.float64))
        for j0 in range(0, 12, 4):  # three blocks of four keys
            state, error = attempt(fn, *state, scores[:, j0:j0 + 4], values[j0:j0 + 4])
            if error is None and not (isinstance(state, tuple) and len(state) == 3):
                error = f"expected a tuple (m, total, acc), got {type(state).__name__}"
            if error is not None:
                return error, ""
        m, total, acc = state
        result, error = attempt(torch.div, acc, total[..., None] if isinstance(total, torch.Tensor) else total)
        if error is None and isinstance(result, torch.Tensor) and not torch.isfinite(result).all():
            error = "acc / total has inf or nan: exp() overflowed — subtract the running max before exp()"
        return (error or compare_tensors("m (running max)", m, scores.amax(-1), atol=1e-9)
                or compare_tensors("acc / total", result, scores.softmax(-1) @ values, atol=1e-9),
                "matches softmax(scores) @ values")

    ok, details = run_cases((("ordinary scores", 0.0), ("scores near 1000 (exp would overflow)", 1000.0)), judge)
    return conclude(ok, details, "online softmax step is right", "online softmax step needs work",
                    "hint: m_new = max(m, row max of scores); multiply total and acc by exp(m - m_new), then add "
                    "p = exp(scores - m_new[:, None]): p.sum(-1) to total and p @ values to acc")


def check_attention_visibility(fn: Callable) -> bool:
    """Notebook 03 (the mask): fn(padding_mask (B, L) bool, True = a real token) -> (B, 1, L, L) bool, True where
    query i may attend to key j: j <= i (causal) and key j is a real token (padding).

    The oracle is transformers' own mask builder: masking_utils.sdpa_mask with the causal mask function and the
    padding mask, the boolean mask that attention implementations receive.
    """
    from transformers.masking_utils import sdpa_mask

    cases = {"no padding": torch.ones(2, 6, dtype=torch.bool),
             "right padding (training batches)": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]).bool(),
             "left padding (generation)": torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]]).bool()}

    def judge(padding: torch.Tensor) -> tuple[str | None, str]:
        expected = sdpa_mask(batch_size=padding.shape[0], q_length=padding.shape[1], kv_length=padding.shape[1],
                             attention_mask=padding, allow_is_causal_skip=False)  # (B, 1, L, L) bool
        got, error = attempt(fn, padding.clone())
        if error is None and isinstance(got, torch.Tensor) and got.dtype != torch.bool:
            error = f"expected dtype torch.bool (True = may attend), got {got.dtype}"
        error = error or compare_tensors("visible keys", got, expected, atol=0)
        if error and "values differ" in error:
            wrong = (got != expected).nonzero()[0].tolist()
            error = (f"batch {wrong[0]}, query {wrong[2]}, key {wrong[3]}: expected "
                     f"{bool(expected[tuple(wrong)])}, got {bool(got[tuple(wrong)])}")
        return error, f"{int(expected.sum())} visible (query, key) pairs, same as transformers"

    ok, details = run_cases(cases.items(), judge)
    return conclude(ok, details, "your mask is the one transformers builds",
                    "your mask differs from transformers'",
                    "hint: torch.ones(L, L, dtype=torch.bool).tril() is causality; padding_mask[:, None, None, :] "
                    "broadcasts the real keys over heads and queries; combine the two with &")

# ---- 04 PEFT wrapping ----

def check_lora_parameter_count(fn: Callable) -> bool:
    """Notebook 04: fn(model, r, target_modules) -> the number of parameters LoRA adds, before wrapping anything.

    The oracle is peft: get_peft_model on a fresh copy of the same small Llama, then get_nb_trainable_parameters().
    """
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)

    def judge(case: tuple[int, list[str]]) -> tuple[str | None, str]:
        r, targets = case
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft calls a transformers alias deprecated in v5
            expected = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=r, target_modules=targets))
        expected = expected.get_nb_trainable_parameters()[0]
        got, error = attempt(fn, LlamaForCausalLM(config), r, list(targets))
        same, _ = attempt(lambda: bool(got == expected))  # a 0-d tensor or numpy int counts; an error is a mismatch
        if error is None and not same:
            error = f"expected {expected:,}, got {got!r:.60}"
        return error, f"{expected:,}"

    cases = ((8, ["q_proj", "v_proj"]), (6, ["q_proj", "k_proj", "v_proj", "o_proj"]),
             (2, ["gate_proj", "up_proj", "down_proj"]))
    ok, details = run_cases(((f"r={r}, {'+'.join(t.replace('_proj', '') for t in targets)}", (r, targets))
                             for r, targets in cases), judge)
    return conclude(ok, details, "your count matches peft's", "the count differs from peft's",
                    "hint: each adapted nn.Linear adds r x (in_features + out_features), A (r, in) and B (out, r); "
                    "a module is adapted when the last part of its name is in target_modules")


def check_is_lora_target(fn: Callable) -> bool:
    """Notebook 04 (harder): fn(name, target_modules) -> whether peft puts an adapter on the module called `name`.

    peft's rule: a list matches a name equal to one entry or ending with "." + entry (so dotted suffixes work, and a
    partial word does not); a single string is a regular expression that must match the whole name. The oracle is
    peft.tuners.tuners_utils.check_target_module_exists, over every module name of a small Llama.
    """
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    names = [name for name, _ in LlamaForCausalLM(config).named_modules() if name]
    cases = [["q_proj", "v_proj"], ["layers.1.self_attn.q_proj", "mlp.down_proj"], ["attn.q_proj"], "q_proj",
             r".*\.1\.self_attn\.(q|v)_proj"]

    def judge(targets: list[str] | str) -> tuple[str | None, str]:
        lora_config = LoraConfig(target_modules=targets)
        expected = [n for n in names if check_target_module_exists(lora_config, n)]
        wrong, error = [], None
        for name in names:
            answer, error = attempt(fn, name, targets if isinstance(targets, str) else list(targets))
            adapted, ambiguous = attempt(bool, answer)  # a re.Match or None counts; a tensor of many values does not
            if error or ambiguous:
                return error or f"{name}: expected True or False, got {answer!r:.60}", ""
            if adapted != (name in expected):
                wrong.append(f"{name} ({'peft adapts it' if name in expected else 'peft leaves it alone'})")
        return (f"{len(wrong)} of {len(names)} names wrong, e.g. {wrong[0]}" if wrong else None,
                f"{len(expected)} module(s) adapted" + (" (peft would raise: nothing matches)" if not expected else ""))

    ok, details = run_cases(((f"target_modules={targets!r}", targets) for targets in cases), judge)
    return conclude(ok, details, "you match module names exactly as peft does",
                    "your matching differs from peft's",
                    'hint: a list entry matches name == entry or name.endswith("." + entry); a string is '
                    "re.fullmatch(target_modules, name)")
