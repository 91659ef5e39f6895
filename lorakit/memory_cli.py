"""`lorakit-plan`: will this training run fit on my GPU? The breakdown, the verdict, and the cheapest changes that fit.

    lorakit-plan --model llama-2-7b --method qlora --seq 2048 --batch 4 --gpu-memory 24
    python -m lorakit.memory_cli --model path/to/checkpoint --method full --zero 3 --ranks 8 --gpu-memory 80
    lorakit-plan --list                        # the bundled model configs

The numbers come from `lorakit.memory.plan` (see its docstring and notebook 08 for the derivation and the checks
against measurement). A GPU adds what no plan counts: the CUDA context (outside PyTorch's allocator, roughly 0.5 GiB),
cuBLAS workspaces and the caching allocator's rounding and fragmentation; keep a margin of a few per cent.
"""

from __future__ import annotations

import argparse
import sys
import typing
from dataclasses import asdict, fields

from lorakit import memory
from lorakit.memory import MODELS, Plan, Setup, plan

GiB = 2**30


def report(p: Plan) -> str:
    """The plan as lines of text: setup, parts in GiB, the peak and the moment of the step it belongs to."""
    s = p.setup
    head = (f"{s.method}, {s.dtype}, batch {s.batch} x seq {s.seq}, checkpointing {'on' if s.checkpointing else 'off'}, "
            f"{s.attention}" + (f", ZeRO-{s.zero} x {s.ranks} ranks, offload {s.offload}" if s.zero is not None else ""))
    lines = [head, f"parameters {p.params:,}, trained {p.trained:,}"]
    lines += [f"  {k:22s} {v / GiB:9.3f} GiB" for k, v in p.parts.items() if v >= 2**20]  # from 1 MiB
    return "\n".join(lines + [f"  {'peak per device':22s} {p.peak / GiB:9.3f} GiB  (at the {p.moment})"])


def changes(setup: Setup) -> list[tuple[str, dict]]:
    """Changes to a setup, cheapest first: free ones, then ones that cost time, then ones that cost quality or GPUs."""
    s, out = setup, []
    if s.attention == "eager":
        out.append(("sdpa attention instead of eager", dict(attention="sdpa")))
    if not s.checkpointing:
        out.append(("gradient checkpointing (about a third more compute)", dict(checkpointing=True)))
    batch, steps = s.batch, s.accumulation
    while batch > 1:
        batch, steps = batch // 2, steps * 2
        out.append((f"micro-batch {batch} with {steps} accumulation steps (same effective batch)",
                    dict(batch=batch, accumulation=steps)))
    if s.method == "full" and not s.optimizer.endswith("8bit"):
        out.append(("8-bit AdamW (bitsandbytes)", dict(optimizer="adamw_8bit")))
    out += [("LoRA instead of full fine-tuning", dict(method="lora"))] * (s.method == "full")
    out += [("QLoRA (4-bit NF4 base)", dict(method="qlora"))] * (s.method != "qlora")
    out += [(f"DeepSpeed ZeRO-3 over {n} GPUs", dict(zero=3, ranks=n)) for n in (2, 4, 8, 16, 32, 64) if n > s.ranks]
    out.append(("DeepSpeed ZeRO-3 with parameters and optimizer offloaded to CPU",
                dict(zero=3, ranks=s.ranks, offload="all")))
    return out


def cheapest_fits(model, setup: Setup, gib: float, limit: int = 4) -> list[tuple[str, Plan]]:
    """Up to `limit` single changes that make the run fit in `gib` GiB; if none does, each with checkpointing too."""
    for extra in ({}, {"checkpointing": True}):
        found = []
        for label, change in changes(setup):
            try:
                p = plan(model, **{**asdict(setup), **extra, **change})
            except ValueError:  # a combination the planner does not model (e.g. QLoRA with ZeRO-3 offload)
                continue
            if p.peak <= gib * GiB:
                found.append((label + (" + gradient checkpointing" if extra and "checkpointing" not in change else ""), p))
        if found:
            return found[:limit]
    return []


def _flag(value: str) -> bool:
    if value.lower() not in ("true", "false", "on", "off", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"{value!r}: use True or False")
    return value.lower() in ("true", "on", "1", "yes")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lorakit-plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a bundled config name (--list), a checkpoint directory or a config.json")
    ap.add_argument("--gpu-memory", type=float, help="GiB per GPU: say whether it fits and what would make it fit")
    ap.add_argument("--list", action="store_true", help="list the bundled model configs and exit")
    hints = typing.get_type_hints(Setup)
    for f in fields(Setup):
        kind = {bool: _flag, int: int, float: float, tuple: None}.get(hints[f.name], str)
        if f.name == "zero":
            kind = int
        ap.add_argument("--" + f.name, default=f.default, type=kind, nargs="+" if f.name == "lora_targets" else None,
                        help=f"{f.metadata['help']} (default: {f.default})")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = vars(ap.parse_args(argv))
    if args.pop("list"):
        for name in sorted(p.stem for p in MODELS.glob("*.json")):
            print(f"{name:16s} {memory.shapes(name).params:>17,} parameters")
        return 0
    model, gib = args.pop("model"), args.pop("gpu_memory")
    if model is None:
        ap.error("--model is required (a bundled name from --list, or a checkpoint directory)")
    args["lora_targets"] = tuple(args["lora_targets"])
    try:
        p = plan(model, **args)
    except (ValueError, FileNotFoundError) as error:
        ap.error(str(error))
    print(report(p))
    if gib is None:
        return 0
    margin = gib - p.peak / GiB
    if margin >= 0:
        print(f"fits in {gib:g} GiB with {margin:.2f} GiB to spare (before the CUDA context and allocator overhead)")
        return 0
    print(f"does NOT fit in {gib:g} GiB: {-margin:.2f} GiB short. Cheapest changes that fit:")
    for label, q in cheapest_fits(model, p.setup, gib) or [("nothing tried fits; fewer tokens per step?", p)]:
        print(f"  - {label}: {q.peak / GiB:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
