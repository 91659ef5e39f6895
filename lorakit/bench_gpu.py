"""One-shot GPU measurements: env, attention kernels, nf4 vs bitsandbytes, LoRA vs QLoRA (SmolLM2-135M shape), and
lorakit-train itself. Each section records its results or its error in the JSON file, rewritten after every section.

    python -m lorakit.bench_gpu --out results.json            # on a CUDA machine: < 5 min on one H200
    python -m lorakit.bench_gpu --smoke --out /tmp/smoke.json  # every section on the CPU at toy sizes (control flow)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
CLI = ["-m", "lorakit.train"]  # what run_cli starts with sys.executable
CLI_DEFAULT_STEPS = 1900  # lorakit-train's default run on the embedded task: 50 epochs x 600 records / batch 16
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
               rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, bos_token_id=1, eos_token_id=2)
FULL = dict(lengths=[1024, 4096, 16384], check_length=1024, repeats=5, attention_budget_s=60.0, layers=30,
            vocab=49152, batch=8, seq=1024, steps=5, nf4_shapes=[(4096, 4096), (1536, 576), (1000, 333), (65,)])
SMOKE = dict(lengths=[128], check_length=128, repeats=2, attention_budget_s=30.0, layers=2, vocab=2048, batch=2,
             seq=64, steps=2, nf4_shapes=[(64, 64), (65,)])


def error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:1500]}"


def mib(nbytes: float) -> float:
    return round(nbytes / 2**20, 1)


def same(a: torch.Tensor, b: torch.Tensor) -> float:  # fraction of equal elements, on any devices
    return round((a.cpu().reshape(-1) == b.cpu().reshape(-1)).float().mean().item(), 6)


def measure(fn, dev: torch.device, repeats: int, warmup: int = 1) -> tuple[float, float | None]:
    """(median seconds of `repeats` calls after `warmup`, peak MiB of one call above what was allocated before it):
    CUDA events and torch.cuda.max_memory_allocated on a GPU; perf_counter and no peak (None) on a CPU."""
    cuda, peak, times = dev.type == "cuda", None, []
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        base, _ = torch.cuda.memory_allocated(), torch.cuda.reset_peak_memory_stats()
        fn()
        peak = mib(torch.cuda.max_memory_allocated() - base)  # the allocator's counter needs no synchronisation
    for _ in range(repeats):
        start, end = (torch.cuda.Event(enable_timing=True) for _ in "se") if cuda else (None, None)
        t0 = start.record() if cuda else time.perf_counter()
        fn()
        if cuda:
            end.record()
            end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 if cuda else time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], peak  # the median (the upper one for an even count)


def section_env(res: dict, dev: torch.device, cfg: dict) -> None:
    res.update(python=sys.version.split()[0], device=str(dev), torch_cuda=torch.version.cuda)
    for name in ("torch", "transformers", "peft", "accelerate", "tokenizers", "bitsandbytes", "flash_attn"):
        try:
            module = __import__(name)
            res[name] = f"{getattr(module, '__version__', '?')} ({Path(module.__file__).parent})"
        except Exception as error:  # absent or broken: either is a result here
            res[name] = f"not importable: {error_text(error)}"
    if dev.type == "cuda":
        props, backends = torch.cuda.get_device_properties(dev), ("flash", "mem_efficient", "cudnn")
        res.update(gpu=props.name, capability=list(torch.cuda.get_device_capability(dev)),
                   bf16=torch.cuda.is_bf16_supported(), memory_gib=round(props.total_memory / 2**30, 1),
                   sdpa_backends={b: getattr(torch.backends.cuda, f"{b}_sdp_enabled")() for b in backends})


def attention_step(name: str, dtype: torch.dtype, length: int, dev: torch.device):
    """(fwd+bwd closure, (q, k, v)) for kernel `name`, masked and dispatched exactly as a Llama model does it."""
    from transformers import AttentionInterface, LlamaConfig
    from transformers.masking_utils import create_causal_mask
    from transformers.models.llama.modeling_llama import LlamaAttention, eager_attention_forward
    config = LlamaConfig(**SMOLLM2, attention_dropout=0.0)
    config._attn_implementation = name
    module = LlamaAttention(config, layer_idx=0).to(dev).train()
    fn = AttentionInterface().get_interface(name, eager_attention_forward)  # LlamaAttention.forward's own lookup
    mask = create_causal_mask(config, torch.zeros(1, length, 1, device=dev, dtype=dtype), None, None,
                              position_ids=torch.arange(length, device=dev)[None])  # None, or eager's (1, 1, L, L)
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, 9, length, 64, device=dev, generator=g).to(dtype).requires_grad_()  # (B, H, L, D)
    k, v = (torch.randn(1, 3, length, 64, device=dev, generator=g).to(dtype).requires_grad_() for _ in "kv")
    grad = torch.randn(1, length, 9, 64, device=dev, generator=g).to(dtype)  # (B, L, H, D), the output's layout

    def step() -> torch.Tensor:
        q.grad = k.grad = v.grad = None
        out, _ = fn(module, q, k, v, mask, dropout=0.0, scaling=module.scaling)  # (B, L, H, D)
        out.backward(grad)
        return out

    return step, (q, k, v)


def section_attention(res: dict, dev: torch.device, cfg: dict) -> None:
    from lorakit import attention
    res["choose_attention(True)"] = list(attention.choose_attention(True))
    kernels = ["eager", "sdpa", attention.register()]
    kernels += ["flash_attention_2"] if attention.flash_attention_2_missing() is None else []
    res["setup"] = "q (1, 9, L, 64), k, v (1, 3, L, 64), bf16, causal; peak: above inputs and mask, dq dk dv included"
    end, timings, errors, check = time.perf_counter() + cfg["attention_budget_s"], {}, res.setdefault("errors", {}), {}
    for name in ["eager fp32"] + kernels:  # bf16 output and input gradients vs eager attention computed in fp32
        try:
            dtype = torch.float32 if name == "eager fp32" else torch.bfloat16
            step, inputs = attention_step(name.split()[0], dtype, cfg["check_length"], dev)
            check[name] = [step().detach().float()] + [t.grad.float() for t in inputs]
        except Exception as error:
            errors[f"check {name}"] = error_text(error)
    res[f"max_abs_diff_vs_fp32_eager_L{cfg['check_length']}"] = {
        name: {label: round((a - b).abs().max().item(), 6)
               for label, a, b in zip(("out", "dq", "dk", "dv"), check[name], check["eager fp32"], strict=True)}
        for name in kernels if name in check and "eager fp32" in check}
    for length in cfg["lengths"]:
        for name in kernels:
            key = f"{name} L={length}"
            try:
                shorter, seconds = timings.get(name, (length, 0.0))
                estimate, left = seconds * (length / shorter) ** 2, end - time.perf_counter()  # work grows as L²
                if estimate * 3 > left:
                    errors[key] = f"skipped: ~{estimate:.2f} s per call (L² from L={shorter}), {left:.0f} s left"
                    continue
                repeats = max(1, min(cfg["repeats"], int(left / max(estimate, 1e-9) / 4)))
                step, _ = attention_step(name, torch.bfloat16, length, dev)
                seconds, peak = measure(step, dev, repeats, warmup=2 if estimate < 1 else 1)
                timings[name] = (length, seconds)
                res[key] = {"fwd_bwd_ms": round(seconds * 1e3, 3), "repeats": repeats, "peak_mib": peak}
            except Exception as error:
                errors[key] = error_text(error)
            step = None  # frees this kernel's tensors before the next one allocates
            gc.collect()


def section_nf4(res: dict, dev: torch.device, cfg: dict) -> None:
    import bitsandbytes.functional as F

    from lorakit.nf4 import dequantize_nf4, quantize_nf4
    res["note"], g = "fractions of identical elements (nf4, blocksize 64, double quant)", torch.Generator()
    for shape in cfg["nf4_shapes"]:
        for dtype in (torch.float32, torch.bfloat16):
            row = res[f"{'x'.join(map(str, shape))} {str(dtype)[6:]}"] = {}
            try:
                w = (torch.randn(shape, generator=g) * 0.02).to(dtype)
                packed_b, state_b = F.quantize_4bit(w.to(dev), blocksize=64, compress_statistics=True, quant_type="nf4")
                deq_b = F.dequantize_4bit(packed_b, state_b).cpu().reshape(-1).float()
                try:
                    (packed, state), row["lorakit_on"] = quantize_nf4(w.to(dev)), str(dev)
                except Exception as error:  # nf4.py not following the input's device (yet): quantise a CPU copy
                    row["lorakit_on"], row["lorakit_device_error"] = "cpu", error_text(error)
                    packed, state = quantize_nf4(w)
                for field in ("absmax", "offset", "absmax2", "code2"):  # compare on the CPU whatever the device
                    setattr(state, field, getattr(state, field).cpu())
                deq = dequantize_nf4(packed.cpu(), state).reshape(-1).float()
                packed_c, state_c = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
                row.update(packed=same(packed, packed_b), absmax_codes=same(state.absmax, state_b.absmax),
                           offset_abs_diff=abs(state.offset.item() - state_b.offset.item()),
                           absmax2=same(state.absmax2, state_b.state2.absmax), dequantized=same(deq, deq_b),
                           dequantized_max_abs_diff=(deq - deq_b).abs().max().item(),
                           bnb_device_vs_bnb_cpu_packed=same(packed_b, packed_c),
                           bnb_device_vs_bnb_cpu_absmax_codes=same(state_b.absmax, state_c.absmax))
            except Exception as error:
                row["error"] = error_text(error)


def train_row(row: dict, qlora: bool, checkpointing: bool, path: str, ids: torch.Tensor, dev: torch.device, steps: int):
    """Load the saved model for LoRA (bf16 base) or QLoRA (NF4 + double quant) and time AdamW steps, into `row`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    if qlora:
        from lorakit import quant  # imports bitsandbytes: a failure here costs the QLoRA rows only
        model = quant.load_in_4bit(path, torch.bfloat16, double_quant=True, attn_implementation="sdpa")
        row.update(weights_mib=mib(model.get_memory_footprint()), bits_per_linear_weight=quant.bits_per_weight(model))
        model = quant.prepare_kbit(model, gradient_checkpointing=checkpointing)
    else:
        device_map = {"device_map": {"": dev.index or 0}} if dev.type == "cuda" else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa",
                                                     **device_map)
        row["weights_mib"] = mib(model.get_memory_footprint())
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM")).train()
    row["trainable_params"] = model.get_nb_trainable_parameters()[0]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16):  # what Trainer does under --bf16 True
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        row["loss"] = round(loss.item(), 4)

    step()  # the AdamW state exists from here on
    seconds, row["peak_step_above_before_mib"] = measure(step, dev, steps, warmup=0)
    row["peak_step_mib"] = mib(torch.cuda.max_memory_allocated()) if dev.type == "cuda" else None
    row.update(step_ms=round(seconds * 1e3, 2), tokens_per_s=round(ids.numel() / seconds))


def section_qlora(res: dict, dev: torch.device, cfg: dict) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM
    res["model"] = (f"SmolLM2-135M architecture ({cfg['layers']} layers, vocab {cfg['vocab']}), random init (memory, "
                    "speed do not depend on the values); bf16, sdpa, autocast bf16 as Trainer --bf16 True; LoRA r=8 "
                    f"q_proj+v_proj; batch {cfg['batch']} x seq {cfg['seq']}; step = forward + backward + AdamW")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        with torch.device(dev):
            config = LlamaConfig(**{**SMOLLM2, "num_hidden_layers": cfg["layers"], "vocab_size": cfg["vocab"]})
            LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp)
        ids = torch.randint(3, cfg["vocab"], (cfg["batch"], cfg["seq"]), device=dev)  # (B, T)
        for qlora in (False, True):
            for checkpointing in (False, True):
                row = res[f"{'qlora' if qlora else 'lora'} gc={'on' if checkpointing else 'off'}"] = {}
                try:
                    train_row(row, qlora, checkpointing, tmp, ids, dev, cfg["steps"])
                except Exception as error:
                    row["error"] = error_text(error)
                gc.collect()  # the model and its optimizer go before the next one loads


def run_cli(extra: list[str], timeout: float) -> dict:
    """lorakit-train in a subprocess: the lines a user reads, the wall time, the end of its output."""
    cmd = [sys.executable, *CLI, "--output_dir", tempfile.mkdtemp(prefix="lorakit-cli-") + "/run", "--bf16", "True",
           "--flash_attn", "True", *extra]
    row, t0 = {"cmd": " ".join(cmd[1:]), "timeout_s": round(timeout)}, time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
        text, row["returncode"] = done.stdout, done.returncode
    except subprocess.TimeoutExpired as error:
        text, row["error"] = error.output or "", f"timeout after {timeout:.0f} s"
        text = text.decode(errors="replace") if isinstance(text, bytes) else text
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    for label, pattern in (("exact_match", "held-out exact match"), ("trainable", "trainable params"),
                           ("train_metrics", "train_runtime"), ("attention", "flash_attn"), ("last_loss", "'loss'")):
        found = [line.strip() for line in text.splitlines() if pattern in line]
        row[label] = found[-1][-400:] if found else None
    row["output_tail"] = text[-2500:]
    return row


def section_cli(res: dict, dev: torch.device, cfg: dict) -> None:
    cap, left = cfg["cli_max_steps"], lambda: cfg["deadline"] - time.perf_counter()
    res["cap"] = f"--max_steps {cap}" if cap else f"none: the full default run ({CLI_DEFAULT_STEPS} steps)"
    res["lora"] = run_cli(["--max_steps", str(cap)] if cap else [], max(30.0, min(150.0, left() - 60)))
    if not cap and (wall := res["lora"]["wall_s"]) * 1.3 + 20 > left():  # QLoRA (slower) must still fit in
        cap = max(20, int(CLI_DEFAULT_STEPS * (left() - 30) / (1.3 * wall)))
        res["qlora_cap"] = f"--max_steps {cap} (the LoRA run took {wall} s, {left():.0f} s were left)"
    res["qlora"] = run_cli(["--q_lora", "True"] + (["--max_steps", str(cap)] if cap else []),
                           max(30.0, min(180.0, left() - 5)))


SECTIONS = dict(env=section_env, attention=section_attention, nf4=section_nf4, qlora=section_qlora,
                cli=section_cli)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorakit.bench_gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file, rewritten after every section")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: checks the control flow only")
    parser.add_argument("--cli-max-steps", type=int, default=None, help="cap lorakit-train's steps (smoke: 2)")
    parser.add_argument("--budget-s", type=float, default=285.0, help="seconds the run should fit in (cli adapts)")
    args = parser.parse_args(argv)
    start, out, results = time.perf_counter(), Path(args.out), {"smoke": args.smoke, "started": time.ctime()}
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    cfg = {**(SMOKE if args.smoke else FULL), "deadline": start + args.budget_s,
           "cli_max_steps": args.cli_max_steps or (2 if args.smoke else None)}
    for name, section in SECTIONS.items():
        res, t0 = results.setdefault(name, {}), time.perf_counter()
        try:
            section(res, dev, cfg)
        except Exception as error:  # record it and go on: one broken section must not cost the others
            res["error"], res["traceback"] = error_text(error), traceback.format_exc()[-3000:]
        res["section_s"], results["total_s"] = round(time.perf_counter() - t0, 1), round(time.perf_counter() - start, 1)
        print(f"[bench_gpu] {name}: {res['section_s']} s {res.get('error', '')}", flush=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=1, default=str))
        tmp.replace(out)  # a reader, or a kill, never meets a half-written file
    return 0


if __name__ == "__main__":
    sys.exit(main())
