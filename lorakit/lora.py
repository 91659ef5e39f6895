"""LoRA from scratch: a low-rank update beside a frozen linear layer, small enough to copy into a project.

    x ↦ W0 x + (α/r) B A x          W0 (d_out, d_in) frozen, A (r, d_in), B (d_out, r) trained, r ≪ min(d_in, d_out)

    from lorakit.lora import add_lora, count_parameters, merge_lora
    names = add_lora(model, ["q_proj", "v_proj"], r=8, alpha=16)    # freezes everything else
    ...train...
    merge_lora(model)                                                 # W0 += (α/r) B A: no extra inference cost
    save_lora(model, "adapter.safetensors")   or   to_peft(model, "adapter_dir")   # stock peft loads the latter

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021), https://arxiv.org/abs/2106.09685;
rsLoRA scaling α/√r: Kalajdzievski (2023), https://arxiv.org/abs/2312.03732.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, safe_open, save_file
from torch import nn


def _is_real(value: object) -> bool:
    # numbers.Real takes Python and NumPy ints and floats; bool is one too, but True as a rate or scale is a mistake
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass
class LoRAConfig:
    """The settings of one LoRA layer, s = α/r (or α/√r); an invalid value raises ValueError naming it and the fix."""

    r: int = field(default=8, metadata={"help": "rank of the update B A; trainable parameters per layer r (d_in + d_out)"})
    alpha: float = field(default=16.0, metadata={"help": "the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the input of the LoRA path only, in [0, 1)"})
    use_rslora: bool = field(default=False, metadata={"help": "rank-stabilised scaling alpha / sqrt(r) (peft use_rslora)"})

    def __post_init__(self) -> None:
        # bool is an int subclass (r=True would be rank 1), and NaN fails every comparison, so `alpha <= 0` lets it
        # through: a NaN or inf alpha would make every output NaN from the first step on
        if isinstance(self.r, bool) or not isinstance(self.r, numbers.Integral) or self.r < 1:
            raise ValueError(f"LoRA rank r={self.r!r} must be a positive integer; the usual values are 4 to 64")
        if not _is_real(self.alpha) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoRA alpha={self.alpha!r} must be a finite number > 0; "
                             f"a common choice is 2 x r (alpha={2 * self.r} for r={self.r})")
        if not _is_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout={self.dropout!r} must be a number in [0, 1); 0.05 is a common value")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"LoRA use_rslora={self.use_rslora!r} must be True or False (rsLoRA scales by alpha / sqrt(r))")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable rank-r update: y = W0 x + b + s B A dropout(x), s = α/r (or α/√r).

    A starts like an nn.Linear weight, kaiming_uniform_(a=√5), as in microsoft/LoRA (loralib/layers.py) and
    peft's reset_lora_parameters; B starts at zero, so the wrapped layer first computes exactly what the base did.

    Args:
        base_layer: the nn.Linear to adapt, weight (d_out, d_in); its parameters are frozen.
        r, alpha, dropout, use_rslora: see LoRAConfig.
    Raises:
        ValueError: r not a positive int, alpha not finite and > 0, dropout outside [0, 1), use_rslora not a bool.
    """

    def __init__(self, base_layer: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base_layer).__name__}")
        self.config = LoRAConfig(r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
        self.scaling = self.config.scaling
        self.base_layer = base_layer.requires_grad_(False)
        weight = base_layer.weight  # (d_out, d_in)
        self.lora_A = nn.Parameter(torch.empty(r, weight.shape[1], device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(weight.shape[0], r, device=weight.device, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., d_in)
        result = self.base_layer(x)  # (..., d_out)
        if not self.enabled:
            if self.merged:
                raise RuntimeError("this LoRA layer is merged into its base weight, so it cannot be disabled: "
                                   "call unmerge() (or unmerge_lora(model)) first")
            return result
        if self.merged:
            return result
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (..., r) -> (..., d_out)
        return result + update * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s B A, shape (d_out, d_in): what merge() adds to W0."""
        return (self.lora_B @ self.lora_A) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """W0 ← W0 + s B A, after which the layer costs exactly one matmul again. No-op when already merged."""
        if not self.merged:
            self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 ← W0 − s B A (equal to the original W0 up to float rounding). No-op when not merged."""
        if self.merged:
            self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.config.r}, alpha={self.config.alpha}, scaling={self.scaling:g}, merged={self.merged}"


def _matches(name: str, target: str) -> bool:
    # peft's rule for a list of names: the full module name, or its ending after a dot
    return name == target or name.endswith("." + target)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: nn.Module, target_modules: Sequence[str] | str, r: int = 8, alpha: float = 16.0,
             dropout: float = 0.0, use_rslora: bool = False) -> list[str]:
    """Replace every nn.Linear whose name ends with a target ("q_proj" or "layers.0.self_attn.q_proj") by a
    LoRALinear, and freeze every other parameter. Returns the names replaced, in model order.

    Unlike peft, every target must match at least one linear layer: a typo is an error that lists the names available.
    """
    config = LoRAConfig(r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if not targets:
        raise ValueError("add_lora needs at least one target module name, e.g. ['q_proj', 'v_proj']")
    done = [t for t in targets if any(_matches(name, t) for name in lora_layers(model))]
    if done:
        raise ValueError(f"{done} already carry LoRA; call add_lora once per model (or start from a fresh base)")
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    missing = [t for t in targets if not any(_matches(name, t) for name in linears)]
    if missing:
        suffixes = sorted({name.rsplit(".", 1)[-1] for name in linears})
        raise ValueError(f"target modules {missing} match no nn.Linear in {type(model).__name__}. Linear layers it "
                         f"has: {suffixes} (or a longer dotted name such as {linears[0]!r})" if linears else
                         f"target modules {missing} match nothing: {type(model).__name__} has no nn.Linear layer")
    model.requires_grad_(False)
    replaced = [name for name in linears if any(_matches(name, t) for t in targets)]
    for name in replaced:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        # a new module starts in training mode; follow the layer it replaces, or dropout would run in an eval model
        setattr(parent, child, LoRALinear(base, **asdict(config)).train(base.training))
    return replaced


def merge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """`with lora_disabled(model): ...` runs the base model (the adapters are kept, only skipped)."""
    layers = lora_layers(model).values()
    if any(layer.merged for layer in layers):
        raise RuntimeError("the adapters are merged into the base weights: call unmerge_lora(model) before disabling")
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter: {"<module>.lora_A": (r, d_in), "<module>.lora_B": (d_out, r)} — a few KB to MB."""
    return {f"{name}.{part}": getattr(layer, part).detach()
            for name, layer in lora_layers(model).items() for part in ("lora_A", "lora_B")}


def _shared_config(model: nn.Module) -> tuple[LoRAConfig, list[str]]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers: call add_lora(model, ...) first")
    configs = {name: layer.config for name, layer in layers.items()}
    if len(set(map(str, configs.values()))) > 1:
        raise ValueError(f"the LoRA layers differ in configuration ({set(map(str, configs.values()))}); "
                         "this saver handles one configuration per model")
    return next(iter(configs.values())), list(layers)


def save_lora(model: nn.Module, path: str | Path) -> Path:
    """Write the adapter and its configuration to one .safetensors file (load it back with load_lora)."""
    config, names = _shared_config(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in lora_state_dict(model).items()}
    save_file(tensors, str(path), metadata={"lorakit": json.dumps({**asdict(config), "modules": names})})
    return path


def load_lora(model: nn.Module, path: str | Path) -> list[str]:
    """Add LoRA to a fresh base model exactly where save_lora found it, and load the saved A and B."""
    with safe_open(str(path), framework="pt") as f:
        meta = (f.metadata() or {}).get("lorakit")
    if meta is None:
        raise ValueError(f"{path} was not written by lorakit.lora.save_lora (no 'lorakit' metadata); "
                         "for a peft adapter directory use peft.PeftModel.from_pretrained")
    settings = json.loads(meta)
    names = add_lora(model, settings.pop("modules"), **settings)
    state = load_file(str(path))
    for name, layer in lora_layers(model).items():
        with torch.no_grad():
            layer.lora_A.copy_(state[f"{name}.lora_A"])
            layer.lora_B.copy_(state[f"{name}.lora_B"])
    return names


def to_peft(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None = None,
            task_type: str | None = "CAUSAL_LM") -> Path:
    """Write the adapter in peft's format (adapter_config.json + adapter_model.safetensors), so that
    `PeftModel.from_pretrained(base, out_dir)` rebuilds the same model. Pass task_type=None for a plain nn.Module.
    """
    from peft import LoraConfig

    config, names = _shared_config(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith(".base_layer")]
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    # short names ("q_proj") when they select exactly the adapted layers, else the full names (peft accepts both)
    exact = not any(_matches(n, s) for n in linears for s in suffixes)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None)
    peft_config = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                             use_rslora=config.use_rslora, target_modules=suffixes if exact else names,
                             task_type=task_type, base_model_name_or_path=base_model_name_or_path)
    out_dir = Path(out_dir)
    peft_config.save_pretrained(str(out_dir))
    # peft's keys: base_model.model.<module>.lora_A.weight (no adapter name on disk)
    tensors = {f"base_model.model.{key}.weight": tensor.contiguous() for key, tensor in lora_state_dict(model).items()}
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors are counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
