"""QLoRA loading: a base model in 4-bit NF4 with the seed's BitsAndBytesConfig, k-bit preparation, a memory report.

    from lorakit.quant import load_in_4bit, prepare_kbit, memory_report
    model = load_in_4bit("data/tiny")            # CPU or GPU; nn.Linear -> bitsandbytes Linear4bit (NF4 + double quant)
    model = prepare_kbit(model)                  # peft's prepare_model_for_kbit_training, refused under ZeRO-3 / FSDP
    memory_report(model)                         # bytes by kind; sums to get_memory_footprint() + the constants

What the 4-bit linear stores (QLoRA, Dettmers et al. 2023): W ≈ c_b · NF4[q] with one 4-bit code q per weight and one
absmax constant c_b per block of 64 weights; with double quantisation the constants are themselves 8-bit codes with
one fp32 scale per 256 of them. The forward pass dequantises W to the compute dtype and multiplies: y = x Wᵀ.

The CPU trap this module guards against (bitsandbytes 0.50, CPUs with AVX512-BF16): the first forward of a Linear4bit
in eval mode without gradients repacks its weight for an inference-only kernel (gemv_4bit) that has no autograd. Every
later training step then gets no gradient through that layer while the loss still prints; LoRA learns nothing.
load_in_4bit switches the repacking off on every Linear4bit (`support_avx512bf16_for_cpu = False`).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch

# bitsandbytes logs a warning about the optional `kernels` package at import on AVX512-BF16 CPUs; it is harmless
# (the fallback kernel is used) and would otherwise land on stderr in every notebook that imports this module.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import bitsandbytes as bnb  # noqa: E402  (after the logger is quietened)
from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse, has_avx512bf16  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402


def seed_config(compute_dtype: torch.dtype = torch.float32, double_quant: bool = True,
                quant_storage: torch.dtype = torch.uint8) -> BitsAndBytesConfig:
    """The seed's (FastChat train_lora.py) quantisation config: NF4 weights, optional double quantisation.

    Args:
        compute_dtype: dtype the 4-bit weights are dequantised to for each matmul (float32 on CPU, bfloat16 on GPU).
        double_quant: also quantise the per-block absmax constants to 8 bits (4.127 instead of 4.5 bits per weight).
        quant_storage: the dtype of the tensor that holds the packed 4-bit codes (two per byte). uint8 by default;
            under DeepSpeed ZeRO-3 it must equal the other parameters' dtype so that the engine can flatten and
            partition all of them alike (the same bytes, viewed as e.g. float32: a (N, M) layer becomes (N*M/8, 1)).
    """
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=double_quant, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=quant_storage)


def cpu_has_eval_trap() -> bool:
    """True on CPUs where bitsandbytes repacks Linear4bit weights for an inference kernel without autograd."""
    return bool(has_avx512bf16())


def guard_eval_trap(model: torch.nn.Module) -> int:
    """Stop every Linear4bit from repacking its weight on an eval forward (and undo a repack already done).

    Returns the number of Linear4bit layers guarded. Safe on GPU and on CPUs without the trap (it changes nothing).
    """
    guarded = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            state = getattr(module.weight, "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                    module.weight.data, state)
            guarded += 1
    return guarded


def load_in_4bit(path: str | os.PathLike, compute_dtype: torch.dtype = torch.float32, double_quant: bool = True,
                 quant_storage: torch.dtype = torch.uint8, **from_pretrained_kwargs) -> torch.nn.Module:
    """Load a causal LM with its linear layers in 4-bit NF4 (the seed's config), guarded against the CPU eval trap.

    Embeddings, norms and the (tied) head stay in `compute_dtype`. On a CUDA machine the model goes to the GPU of this
    process (LOCAL_RANK under torchrun/deepspeed, else 0), as the seed does; otherwise it stays on the CPU.

    Args:
        path: a checkpoint directory (config.json + weights), or a hub id "org/name" where a hub is reachable.
        compute_dtype: dtype for the dequantised matmuls and the unquantised parameters.
        double_quant: quantise the absmax constants too (bnb_4bit_use_double_quant).
        quant_storage: dtype holding the packed codes; pass compute_dtype under ZeRO-3 (see seed_config).
        **from_pretrained_kwargs: passed on (device_map, attn_implementation, quantization_config to override, ...).
    """
    if not Path(path).exists() and str(path).count("/") != 1:
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}: pass a directory holding config.json and weights "
                                f"(for the embedded model: lorakit.models.resolve('tiny')) or a hub id 'org/name'")
    from transformers.integrations import is_deepspeed_zero3_enabled

    kwargs = {"quantization_config": seed_config(compute_dtype, double_quant, quant_storage), "dtype": compute_dtype}
    if torch.cuda.is_available() and not is_deepspeed_zero3_enabled():  # ZeRO-3 places the shards itself
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    kwargs.update(from_pretrained_kwargs)
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per load would clutter notebook outputs
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    guard_eval_trap(model)
    model.eval()
    return model


def _fsdp_enabled() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def prepare_kbit(model: torch.nn.Module, gradient_checkpointing: bool = True, zero3: bool = False) -> torch.nn.Module:
    """Make a 4-bit model trainable with adapters: peft's prepare_model_for_kbit_training, explained.

    It (1) freezes every base parameter, (2) casts the non-4-bit parameters that are fp16/bf16 (norms, embeddings,
    head) to fp32 for stable training, and (3) with gradient checkpointing, makes the embedding output require grad so
    that checkpointed blocks, whose inputs would otherwise all be frozen, still pass gradients back to the adapters.
    Call it before get_peft_model; the adapters added afterwards are the only trainable parameters.

    Under DeepSpeed ZeRO-3 or FSDP it must not run: it casts and re-flags parameters that the engine owns and shards
    (ZeRO-3 holds them as 0-element placeholders), so it raises ValueError with what to do instead. The seed only
    warned and called it anyway.

    Args:
        model: a model from load_in_4bit (or any transformers model; unquantised ones are frozen and upcast too).
        gradient_checkpointing: recompute activations in backward (memory for time), non-reentrant variant.
        zero3: True when the run uses DeepSpeed ZeRO-3 (also detected from the active HF DeepSpeed config).
    """
    from peft import prepare_model_for_kbit_training
    from transformers.integrations import is_deepspeed_zero3_enabled

    if zero3 or is_deepspeed_zero3_enabled() or _fsdp_enabled():
        raise ValueError(
            "prepare_kbit: QLoRA under DeepSpeed ZeRO-3 / FSDP must not call prepare_model_for_kbit_training (it casts "
            "and freezes parameters the engine shards). Instead: load with BitsAndBytesConfig(..., "
            "bnb_4bit_quant_storage=torch.bfloat16) so 4-bit weights shard like bf16 tensors, skip this call, and enable "
            "gradient checkpointing in TrainingArguments(gradient_checkpointing=True, "
            "gradient_checkpointing_kwargs={'use_reentrant': True}); or train QLoRA with ZeRO-2 or plain DDP.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft calls a transformers alias deprecated in v5
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    if gradient_checkpointing and getattr(model, "config", None) is not None:
        model.config.use_cache = False  # a KV cache is useless while training and clashes with checkpointing
    return model


KINDS = ("linear weights", "embeddings and head", "norms and other", "buffers", "quantisation constants")


def _constants(state) -> list[torch.Tensor]:
    """Tensors of a bitsandbytes QuantState: absmax (8-bit or fp32), codebooks, offset, and the nested state."""
    tensors = [getattr(state, name, None) for name in ("absmax", "code", "offset")]
    if getattr(state, "state2", None) is not None:
        tensors += _constants(state.state2)
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def memory_report(model: torch.nn.Module) -> dict[str, int]:
    """Bytes held by the model, by kind.

    linear weights: nn.Linear / Linear4bit / Linear8bitLt weights (packed uint8 for 4-bit: two weights per byte);
    embeddings and head: nn.Embedding and an untied lm_head; norms and other: every other parameter; buffers: rotary
    tables and the like; quantisation constants: absmax, codebooks and offsets of the 4-bit layers, or the row scales
    (SCB) of 8-bit layers. Tensors shared between layers (a codebook, a tied head) are counted once.

    The first four kinds sum to exactly `model.get_memory_footprint()`, which counts parameters and buffers only: the
    quantisation constants live on a side object (QuantState) and are missing from transformers' figure.
    """
    report = dict.fromkeys(KINDS, 0)
    owner = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owner.setdefault(id(param), module)
    seen: set[int] = set()

    def add(kind: str, tensor: torch.Tensor) -> None:
        # constants are deduplicated by storage (one codebook object may serve many layers), the rest by identity
        # exactly as model.parameters() / model.buffers() do
        key = tensor.data_ptr() if kind == "quantisation constants" else id(tensor)
        if key not in seen:
            seen.add(key)
            report[kind] += tensor.nelement() * tensor.element_size()

    for _, param in model.named_parameters():
        module = owner[id(param)]
        if isinstance(module, torch.nn.Embedding) or module is getattr(model, "lm_head", None):
            add("embeddings and head", param)
        elif isinstance(module, torch.nn.Linear) and param is module.weight:
            add("linear weights", param)
            state = getattr(param, "quant_state", None)
            for tensor in _constants(state) if state is not None else []:
                add("quantisation constants", tensor)
            if isinstance(getattr(param, "SCB", None), torch.Tensor):
                add("quantisation constants", param.SCB)
        else:
            add("norms and other", param)
    for buffer in model.buffers():
        add("buffers", buffer)
    return report


def linear_weight_count(model: torch.nn.Module) -> int:
    """Number of weights in the linear layers (lm_head excluded), before any packing: a 4-bit layer stores n/2 bytes."""
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not getattr(model, "lm_head", None):
            state = getattr(module.weight, "quant_state", None)
            total += int(torch.Size(state.shape).numel()) if state is not None else module.weight.numel()
    return total


def bits_per_weight(model: torch.nn.Module) -> float:
    """Bits per linear weight including its quantisation constants: 32 fp32, 16 bf16, ~4.127 NF4 + double quant."""
    report = memory_report(model)
    return 8 * (report["linear weights"] + report["quantisation constants"]) / linear_weight_count(model)
