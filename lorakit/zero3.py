"""DeepSpeed ZeRO-3 for LoRA: run it on a laptop's CPUs, and save the adapter correctly.

ZeRO-3 splits every parameter across the Nd ranks: rank r keeps a flat slice `p.ds_tensor` of ceil(numel / Nd)
elements, and `p.data` is an empty tensor of shape (0,) until a collective all-gather fills it for a forward pass.
Reading `p` at any other moment (a state_dict, peft's `save_pretrained`) silently yields 0-element tensors: the
classic "empty adapter" bug. `save_adapter` gathers exactly the adapter tensors on every rank, writes on rank 0 only,
and refuses to write a 0-element tensor.

This module is the part a project copies: it imports torch, and peft / deepspeed where a function needs them, nothing
of lorakit. In a training script, on every rank:

    maybe_init_cpu_distributed(ds_config)       # without CUDA: before TrainingArguments(deepspeed=ds_config, ...)
    ...                                         # build the model, get_peft_model, Trainer(...).train()
    save_adapter(trainer, "runs/x", bias="none")  # gathers under ZeRO-3, rank 0 writes, 0-element tensors refused

The ZeRO arithmetic, Figure 1 of the paper (7.5B parameters, 64 devices, stage 3):

    >>> round(zero_memory_bytes(7.5e9, 64, stage=3) / 1e9, 3)
    1.875

A two-rank run on CPU that exercises all of it: `torchrun --nproc_per_node 2 -m lorakit.zero3_demo --out DIR`.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import typing
from collections.abc import Iterable
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parent / "configs"  # lorakit's DeepSpeed JSON configs (zero2, zero3, offload)
NamedParameters = Iterable[tuple[str, torch.nn.Parameter]]  # what model.named_parameters() yields


def zero_memory_bytes(num_params: float, num_devices: int, stage: int, k: int = 12) -> float:
    """Per-device bytes of model states under ZeRO stage 0-3 (Rajbhandari et al. 2020, mixed-precision Adam).

    Each of the Ψ parameters costs 2 bytes (fp16/bf16 weight) + 2 (gradient) + K = 12 (fp32 master weight, Adam
    momentum and variance); stage s shards the last s of those three groups over the Nd devices:

        stage 0 (plain data parallel):  (2 + 2 + K) Ψ        = 16Ψ
        stage 1 (optimizer states):     (2 + 2) Ψ + K Ψ / Nd = 4Ψ + 12Ψ/Nd
        stage 2 (+ gradients):          2Ψ + (2 + K) Ψ / Nd  = 2Ψ + 14Ψ/Nd
        stage 3 (+ parameters):         (2 + 2 + K) Ψ / Nd   = 16Ψ/Nd

    Activations, buffers and fragmentation come on top. Under LoRA, K and the gradient apply to the adapter only.

    Args:
        num_params: Ψ, the parameter count.
        num_devices: Nd, the data-parallel ranks.
        stage: 0, 1, 2 or 3.
        k: optimizer-state bytes per parameter (12 for mixed-precision Adam).
    """
    if stage not in (0, 1, 2, 3) or num_devices < 1:
        raise ValueError(f"stage={stage}, num_devices={num_devices}: stage must be 0-3 and num_devices >= 1")
    weights, grads, states = 2 * num_params, 2 * num_params, k * num_params
    sharded = {0: 0.0, 1: states, 2: states + grads, 3: states + grads + weights}[stage]
    return weights + grads + states - sharded + sharded / num_devices


def maybe_init_cpu_distributed(deepspeed_config: str | os.PathLike | dict | None) -> None:
    """Make DeepSpeed usable on a machine without CUDA; call it BEFORE building TrainingArguments.

    A no-op when `deepspeed_config` is None, or when CUDA is present (DeepSpeed then sets itself up with nccl).
    On CPU: a plain `python script.py` gets the single-process variables RANK=0, WORLD_SIZE=1, LOCAL_RANK=0,
    MASTER_ADDR, MASTER_PORT (without them zero.Init asks for mpi4py), and the process group is created with gloo
    now, so that the TrainingArguments built afterwards see the real world size (otherwise DeepSpeed's batch-size
    check computes with world size 1 and asserts under torchrun). Variables a launcher already set are kept.
    The TrainingArguments also need use_cpu=True: the environment variable ACCELERATE_USE_CPU is NOT a substitute
    (measured: the engine then runs the forward on un-gathered ZeRO-3 weights, "'weight' must be 2-D").

    Args:
        deepspeed_config: the --deepspeed value (a JSON path or a dict), or None when DeepSpeed is not used.
    """
    if deepspeed_config is None or torch.cuda.is_available():
        return
    defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": os.environ.get("LORAKIT_MASTER_PORT", "29511")}
    single = "WORLD_SIZE" not in os.environ  # no launcher: this process hosts the rendezvous itself
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    if single and not port_is_free(int(os.environ["MASTER_PORT"])):
        raise OSError(f"port {os.environ['MASTER_PORT']} (MASTER_PORT) is in use, perhaps by another run; set "
                      "LORAKIT_MASTER_PORT (or MASTER_PORT) to a free port")
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on host:port (a rendezvous there would fail or hang).

    Args:
        port: the TCP port, e.g. MASTER_PORT.
        host: the address to probe, loopback by default.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        return probe.connect_ex((host, port)) != 0


def _rank() -> int:
    """This process's rank, 0 without a process group (a plain single-process run)."""
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_rank() if initialized else 0


@functools.cache
def bias_modes() -> tuple[str, ...]:
    """peft's LoraConfig(bias=...) choices, read from its annotation Literal["none", "all", "lora_only"]."""
    from peft import LoraConfig

    return typing.get_args(typing.get_type_hints(LoraConfig)["bias"])


def adapter_parameter_names(named_params: NamedParameters, bias: str = "none") -> list[str]:
    """Names of the parameters that make up the adapter, for one peft bias mode (keys as in model.named_parameters()).

    none:      the LoRA matrices (`...q_proj.lora_A.default.weight`, `...lora_B...`)
    all:       those + every bias of the model (`...bias`)
    lora_only: those + the bias of each LoRA-wrapped layer, which current peft keeps on the wrapped layer:
               `...q_proj.base_layer.bias` (not `...q_proj.bias`, the key the 2023 seed looked for)

    Args:
        named_params: (name, parameter) pairs, e.g. model.named_parameters() of a PeftModel.
        bias: "none", "all" or "lora_only", as in LoraConfig(bias=...).
    """
    if bias not in bias_modes():
        raise ValueError(f"bias={bias!r} is not a peft bias mode: use one of {', '.join(bias_modes())}")
    names = [name for name, _ in named_params]
    lora = [n for n in names if "lora_" in n]
    if bias == "none":
        return lora
    if bias == "all":
        return [n for n in names if "lora_" in n or n.endswith(".bias") or n == "bias"]
    wrapped = {n.split("lora_")[0] + "base_layer.bias" for n in lora}  # one per LoRA-wrapped layer
    return [n for n in names if n in wrapped or "lora_" in n]


def maybe_zero_3(param: torch.nn.Parameter) -> torch.Tensor:
    """A full CPU copy of one parameter, gathered first when ZeRO-3 partitions it (the seed's helper, corrected).

    Fixed: the seed asserted `ds_status == NOT_AVAILABLE`, which fails for a parameter ZeRO-3 keeps whole (below
    stage3_param_persistence_threshold, e.g. every LoRA matrix with "auto") or one already gathered. Gathering is a
    collective: every rank must call this, in the same order. To save a whole adapter, get_peft_state_maybe_zero_3
    gathers all its tensors in one call instead of one call per tensor.

    Args:
        param: any parameter; under ZeRO-3 its `.data` is a (0,) placeholder and `ds_id` marks it as managed.
    Returns:
        a detached CPU tensor of the parameter's full shape, a copy (later training cannot change it).
    """
    if hasattr(param, "ds_id"):
        from deepspeed import zero

        with zero.GatheredParameters([param], modifier_rank=None):
            return param.data.detach().cpu().clone()
    return param.detach().cpu().clone()


def get_peft_state_maybe_zero_3(named_params: NamedParameters, bias: str = "none") -> dict[str, torch.Tensor]:
    """The adapter tensors (full, on CPU) keyed like model.named_parameters(); the seed's function, corrected.

    Fixed: its lora_only branch iterated a dict without .items(), used the stale `bias_name` of the last LoRA key, and
    looked for `<layer>.bias` where current peft keeps `<layer>.base_layer.bias`; it gathered one parameter at a time.
    Here all selected parameters are gathered in one collective call (every rank must call it).

    Args:
        named_params: an iterable of (name, parameter), e.g. model.named_parameters() of a PeftModel.
        bias: "none", "all" or "lora_only", as in LoraConfig(bias=...).
    """
    params = dict(named_params)
    names = adapter_parameter_names(params.items(), bias)
    partitioned = [params[n] for n in names if hasattr(params[n], "ds_id")]
    if not partitioned:
        return {n: params[n].detach().cpu().clone() for n in names}
    from deepspeed import zero

    with zero.GatheredParameters(partitioned, modifier_rank=None):
        return {n: params[n].data.detach().cpu().clone() for n in names}


def check_not_empty(state_dict: dict[str, torch.Tensor]) -> None:
    """Raise ValueError when any tensor has 0 elements (the signature of an un-gathered ZeRO-3 parameter) or none.

    Args:
        state_dict: the tensors about to be written, by name.
    """
    empty = sorted(name for name, tensor in state_dict.items() if tensor.numel() == 0)
    if empty:
        raise ValueError(
            f"refusing to save an adapter with {len(empty)} empty (0-element) tensor(s), e.g. {empty[0]!r}: these are "
            "ZeRO-3 partitions read without gathering. Save with lorakit.zero3.save_adapter(trainer, dir) (called on "
            "every rank), trainer.save_model(), or inside deepspeed.zero.GatheredParameters(params).")
    if not state_dict:
        raise ValueError("refusing to save an empty adapter: no LoRA tensors found. Is this a peft model with LoRA "
                         "layers (get_peft_model(model, LoraConfig(...)))?")


def write_adapter(model: torch.nn.Module, output_dir: str | os.PathLike, state_dict: dict[str, torch.Tensor],
                  adapter_name: str = "default") -> Path:
    """Write adapter_model.safetensors + adapter_config.json from `state_dict` (named_parameters keys), after checking.

    The selection and renaming of keys (adapter name removed) is peft's own, so that PeftModel.from_pretrained reads
    the files back; the check runs on exactly what would be written.

    Args:
        model: the PeftModel (its adapter config and save_pretrained are used, not its tensors).
        output_dir: where adapter_model.safetensors and adapter_config.json go.
        state_dict: full tensors keyed like model.named_parameters(), e.g. from get_peft_state_maybe_zero_3.
        adapter_name: which adapter of the model to write.
    Returns:
        output_dir as a Path.
    """
    from peft import get_peft_model_state_dict

    check_not_empty(get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=adapter_name))
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir, state_dict=state_dict, selected_adapters=[adapter_name])
    return output_dir


def save_adapter(trainer_or_model: object, output_dir: str | os.PathLike, bias: str = "none") -> Path:
    """Save a LoRA adapter correctly, with or without ZeRO-3; call it on EVERY rank (the gather is collective).

    Under ZeRO-3 each rank holds 1/Nd of every tensor; the adapter tensors are gathered (all at once, read-only),
    copied to CPU, and rank 0 writes them. Without ZeRO-3 the tensors are read directly. 0-element tensors are refused.

    Args:
        trainer_or_model: a transformers Trainer whose model is a PeftModel, or the PeftModel itself.
        output_dir: where adapter_model.safetensors and adapter_config.json go.
        bias: "none", "all" or "lora_only"; must equal the LoraConfig's bias (what peft trained and will reload).
    Returns:
        output_dir as a Path.
    """
    from peft import PeftModel

    model = trainer_or_model
    if not isinstance(model, PeftModel) and hasattr(model, "args"):  # a Trainer: .model is the unwrapped model
        model = model.model
    if not isinstance(model, PeftModel):  # a DeepSpeed engine or DDP wrapper around the PeftModel
        model = getattr(model, "module", model)
    if not isinstance(model, PeftModel):
        raise ValueError(f"save_adapter needs a peft model (or a Trainer holding one), got {type(model).__name__}: "
                         "wrap the model with peft.get_peft_model(model, LoraConfig(...)) first")
    adapter = getattr(model, "active_adapter", "default")
    configured = getattr(model.peft_config[adapter], "bias", "none")
    if bias != configured:
        raise ValueError(f"save_adapter(bias={bias!r}) but the adapter was trained with LoraConfig(bias="
                         f"{configured!r}): pass bias={configured!r} so that the trained biases are saved and reloaded")
    state = get_peft_state_maybe_zero_3(model.named_parameters(), bias)
    output_dir = Path(output_dir)
    if _rank() == 0:
        write_adapter(model, output_dir, state, adapter_name=adapter)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank returns before the files exist
    return output_dir


def partition_report(model: torch.nn.Module) -> dict:
    """What this rank holds of every parameter: numel of its ZeRO-3 slice (`ds_tensor`) vs the full `ds_numel`.

    Returns {"local_bytes", "total_bytes", "fraction" (local/total), "min_fraction", "max_fraction" (over parameters),
    "parameters"}; a parameter that ZeRO-3 does not partition counts as held whole (fraction 1).

    Args:
        model: the module the engine wraps (trainer.model_wrapped.module), after DeepSpeed partitioned it.
    """
    local = total = 0
    fractions = []
    for p in model.parameters():
        full = getattr(p, "ds_numel", p.numel())
        held = p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
        local, total = local + held * p.element_size(), total + full * p.element_size()
        fractions.append(held / full)
    return {"local_bytes": local, "total_bytes": total, "fraction": local / total, "min_fraction": min(fractions),
            "max_fraction": max(fractions), "parameters": len(fractions)}


def load_config(path: str | os.PathLike, persistence_threshold: int | None = None) -> dict:
    """A DeepSpeed JSON config as a dict; optionally with stage3_param_persistence_threshold overridden.

    With "auto" (10 * hidden_size elements) ZeRO-3 keeps every tensor smaller than that whole on every rank, LoRA
    matrices included; 0 partitions everything, which shows ZeRO-3's true split.

    Args:
        path: the JSON file, e.g. CONFIGS / "zero3.json".
        persistence_threshold: elements below which ZeRO-3 keeps a tensor whole; None keeps the file's value.
    """
    config = json.loads(Path(path).read_text())
    if persistence_threshold is not None:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = persistence_threshold
    return config

