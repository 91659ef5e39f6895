"""Check `lorakit.memory.plan` against reality: the measured peak of real training steps, on CPU or GPU.

    python -m lorakit.memory_check --model smollm2 --out data/memory/smollm2-135m-cpu.json     # CPU, ~15 minutes
    python -m lorakit.memory_check --gpu --out runs/memory-gpu.json                            # CUDA, ~1 minute

A step is what the Trainer does: forward under autocast (16-bit dtypes), loss, backward, AdamW step, zero_grad(set_to_
none=True), after one step that created the optimizer states. On CPU the peak comes from `lorakit.meter` (every tensor
allocated through PyTorch's dispatcher, counted exactly); the model's tensors are re-created inside the metered call
so that it sees them too. On CUDA it is `torch.cuda.max_memory_allocated()`, which also counts the cuBLAS workspaces
that the allocator hands out (one per handle and stream: the forward thread and autograd's backward thread).
`--gpu` builds the SmolLM2-135M shape with random weights (memory does not depend on the values) in a temporary folder
and measures the H200 grid of data/gpu/h200-2026-12-04.json plus a few more cells, each next to its prediction.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from lorakit import memory, meter
from lorakit.models import resolve

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load(path: str | Path, setup: memory.Setup, device: str = "cpu") -> torch.nn.Module:
    """The model as the planner assumes it: full / LoRA on a `dtype` base, or QLoRA (NF4 + double quant, k-bit
    prepared), gradient checkpointing (non-reentrant), peft LoRA (alpha 16) on `lora_targets`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    s, dtype = setup, DTYPES[setup.dtype]
    if s.method == "qlora":
        from lorakit import quant  # bitsandbytes: imported only when measuring QLoRA
        model = quant.load_in_4bit(path, dtype, attn_implementation=s.attention)
        model = quant.prepare_kbit(model, gradient_checkpointing=s.checkpointing)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=s.attention,
                                                     device_map={"": device} if device != "cpu" else None)
        if s.checkpointing and hasattr(model, "activation_checkpointing_enable"):  # transformers 5's new name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif s.checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if s.checkpointing:
            model.enable_input_require_grads()  # a frozen embedding: checkpointed layers still pass gradients
    model.config.use_cache = False
    if s.method != "full":
        model = get_peft_model(model, LoraConfig(r=s.lora_r, lora_alpha=16, lora_dropout=s.lora_dropout,
                                                 target_modules=list(s.lora_targets), task_type="CAUSAL_LM"))
    return model.train()


def _recreate(model: torch.nn.Module) -> None:
    """Give every parameter, buffer and 4-bit quantisation constant a fresh storage with the same bytes, so that a
    meter started before this call counts the model (it counts only tensors allocated while it runs)."""
    copies: dict[tuple[int, int], torch.UntypedStorage] = {}

    def fresh(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in copies:  # shared storages (tied weights) stay shared; a fresh one maps to itself
            copies[key] = storage.clone()
            copies[(copies[key].data_ptr(), storage.nbytes())] = copies[key]
        return torch.empty(0, dtype=t.dtype, device=t.device).set_(copies[key], t.storage_offset(), t.shape, t.stride())

    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                param.data = fresh(param.data)
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = fresh(buffer)
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        while state is not None:
            for name in ("absmax", "code", "offset"):
                if isinstance(getattr(state, name, None), torch.Tensor):
                    setattr(state, name, fresh(getattr(state, name)))
            state = getattr(state, "state2", None)


def measure(path: str | Path, steps: int = 2, **setup) -> int:
    """Peak bytes of training steps on `setup.device` (cpu: lorakit.meter; cuda: the allocator's peak)."""
    s = memory.Setup(**setup)
    model = load(path, s, s.device)
    device, vocab = next(model.parameters()).device, model.config.vocab_size
    generator = torch.Generator().manual_seed(0)

    def run() -> None:
        if device.type == "cpu":
            _recreate(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for _ in range(steps):
            ids = torch.randint(3, vocab, (s.batch, s.seq), generator=generator).to(device)  # (B, T)
            labels = ids.clone()  # (B, T) as a collator makes them
            with torch.autocast(device.type, dtype=DTYPES[s.dtype], enabled=s.dtype != "fp32"):
                loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            del loss
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        run()
        return torch.cuda.max_memory_allocated()
    return meter.peak_allocated(run)


def check(path: str | Path, model: str | Path | dict, cells: list[dict]) -> list[dict]:
    """Measure each cell (a dict of Setup fields) and put it next to plan(model, **cell)."""
    rows = []
    for cell in cells:
        start = time.perf_counter()
        measured, predicted = measure(path, **cell), memory.plan(model, **cell)
        rows.append(dict(cell, measured=measured, predicted=predicted.peak, ratio=round(predicted.peak / measured, 4),
                         moment=predicted.moment, seconds=round(time.perf_counter() - start, 1)))
        print(json.dumps(rows[-1]), flush=True)
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rows


def grid(sizes: list[tuple[int, int]], device: str = "cpu", dtype: str = "fp32") -> list[dict]:
    """full / LoRA / QLoRA x checkpointing off / on x sizes (batch, seq): the planner's default LoRA (r 8, q+v)."""
    return [dict(method=m, checkpointing=c, batch=b, seq=t, device=device, dtype=dtype)
            for b, t in sizes for m in ("full", "lora", "qlora") for c in (False, True)]


def gpu_cells() -> list[dict]:
    """The H200 grid (LoRA / QLoRA x checkpointing, 8 x 1024, bf16) and full fine-tuning, all-linear QLoRA, eager."""
    base = dict(dtype="bf16", batch=8, seq=1024, device="cuda")
    every = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return [dict(base, method=m, checkpointing=c) for m in ("lora", "qlora") for c in (False, True)] + [
        dict(base, method="full", checkpointing=True), dict(base, method="qlora", checkpointing=True, lora_targets=every),
        dict(base, method="lora", checkpointing=False, attention="eager", batch=2)]


def cublas_workspace() -> int:
    """Bytes the caching allocator hands to cuBLAS for a first matmul forward and backward (two threads)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    x = torch.randn(64, 64, device="cuda", requires_grad=True)
    (x @ x).sum().backward()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() - before - 2 * x.nbytes  # x and its gradient


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lorakit.memory_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--model", default="smollm2", help="a checkpoint (lorakit.models.resolve): tiny, smollm2, a path")
    ap.add_argument("--gpu", action="store_true", help="CUDA: the SmolLM2-135M shape with random weights")
    args = ap.parse_args(argv)
    result: dict = {"command": "python -m lorakit.memory_check " + " ".join(sys.argv[1:] if argv is None else argv),
                    "torch": torch.__version__, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.gpu:
        if not torch.cuda.is_available():
            ap.error("--gpu needs CUDA (torch.cuda.is_available() is False)")
        from transformers import AutoConfig, AutoModelForCausalLM
        result.update(gpu=torch.cuda.get_device_name(), cublas_workspace_bytes=cublas_workspace())
        with tempfile.TemporaryDirectory() as tmp:
            config = AutoConfig.for_model(**memory.load_config("smollm2-135m"))
            AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp)
            result["rows"] = check(tmp, "smollm2-135m", gpu_cells())
    else:
        path = resolve(args.model)
        result.update(model=args.model, rows=check(path, path, grid([(2, 128), (4, 512)])))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}: prediction / measurement from {min(r['ratio'] for r in result['rows'])} to "
          f"{max(r['ratio'] for r in result['rows'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
