"""Will it fit? Peak training memory per device for full / LoRA / QLoRA, from a model's config alone.

    from lorakit.memory import plan
    config = dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
    p = plan(config, method="qlora", batch=4, seq=512, checkpointing=True)
    assert p.params == 3_414_272 and p.peak == sum(p.parts.values()) > 0

Exact where arithmetic is exact (meta-device parameter counts, NF4, AdamW, ZeRO); activations derived tensor by tensor
(`layer_terms`), the peak being the largest moment of a step (`plan` names it), within 0.1% of allocations measured op
by op on CPU (notebook 08). Not counted: CUDA context, allocator cache, cuBLAS workspaces. CLI: `lorakit-plan`.
"""

from __future__ import annotations

import functools
import json
from collections import namedtuple
from dataclasses import dataclass, field
from pathlib import Path

import torch

MODELS = Path(__file__).resolve().parent / "configs" / "models"  # bundled config.json files, public facts
GROUPS = ("norm1", "attn_in", "attn", "o", "norm2", "mlp_in", "mlp", "down")  # a decoder layer, in forward order
PROJ = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o", "gate_proj": "mlp_in",
        "up_proj": "mlp_in", "down_proj": "down"}


def load_config(model: str | Path | dict) -> dict:
    """A config as a dict: a bundled name (a file in MODELS), a checkpoint directory or config.json, or a dict."""
    if isinstance(model, dict):
        return dict(model)
    path = MODELS / f"{model}.json" if (MODELS / f"{model}.json").is_file() else Path(model)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no model config {str(model)!r}: use a bundled name ({', '.join(sorted(p.stem for p in MODELS.glob('*.json')))}), a "
                                "checkpoint directory holding config.json, or a config.json file")
    return json.loads(path.read_text())


# A decoder's sizes from the model built on the meta device: parameters (tied once), ..., one layer's projections
# ((name, in, out, bias), ...) in forward order, buffer bytes, every parameter's numel in model.parameters() order.
Shapes = namedtuple("Shapes", "params layers hidden inter heads kv_heads head_dim vocab tied linear buffers order")


@functools.lru_cache(maxsize=64)
def _shapes(config_json: str) -> Shapes:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads(config_json)
    config = AutoConfig.for_model(config.pop("model_type", "llama"), **config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = getattr(getattr(model, "model", None), "layers", None) or [torch.nn.Module()]
    lin = {n.rsplit(".", 1)[-1]: m for n, m in layers[0].named_modules() if isinstance(m, torch.nn.Linear)}
    if sorted(lin) != sorted(PROJ):
        raise ValueError(f"{config.model_type}: the planner models Llama-style decoders (q/k/v/o_proj, gate/up/"
                         f"down_proj in model.layers); this model's first layer has {sorted(lin) or 'none'}")
    params = list({id(p): p for p in model.parameters()}.values())
    embed, head_dim = model.get_input_embeddings(), lin["q_proj"].out_features // config.num_attention_heads
    return Shapes(sum(p.numel() for p in params), len(layers), config.hidden_size, lin["gate_proj"].out_features,
                  config.num_attention_heads, lin["k_proj"].out_features // head_dim, head_dim, embed.num_embeddings,
                  model.get_output_embeddings().weight is embed.weight,
                  tuple((n, m.in_features, m.out_features, m.bias is not None) for n, m in lin.items()),
                  sum(b.numel() * b.element_size() for b in model.buffers()), tuple(p.numel() for p in params))


def shapes(model: str | Path | dict) -> Shapes:
    return _shapes(json.dumps(load_config(model), sort_keys=True))


@dataclass(frozen=True)
class Setup:
    method: str = field(default="lora", metadata={"help": "full | lora | qlora"})
    dtype: str = field(default="bf16", metadata={"help": "fp32 | bf16 | fp16: weights (QLoRA: compute) and autocast"})
    batch: int = field(default=1, metadata={"help": "micro-batch per device"})
    seq: int = field(default=2048, metadata={"help": "tokens per sequence"})
    checkpointing: bool = field(default=False, metadata={"help": "gradient checkpointing (non-reentrant)"})
    attention: str = field(default="sdpa", metadata={"help": "sdpa | flash_attention_2 | eager (keeps T×T scores)"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_targets: tuple = field(default=("q_proj", "v_proj"), metadata={"help": "LoRA target projections"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (> 0 keeps a mask per target)"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw | adamw_8bit | paged_adamw | paged_adamw_8bit"})
    accumulation: int = field(default=1, metadata={"help": "gradient accumulation steps (> 1: gradients stay)"})
    zero: int | None = field(default=None, metadata={"help": "DeepSpeed ZeRO stage 0-3; none: no DeepSpeed"})
    ranks: int = field(default=1, metadata={"help": "data-parallel ranks under DeepSpeed"})
    offload: str = field(default="none", metadata={"help": "none | optimizer | all (ZeRO-3: parameters too)"})
    device: str = field(default="cuda", metadata={"help": "cuda | cpu: dropout masks and AdamW kernels differ"})

    def __post_init__(self):
        choices = dict(method=("full", "lora", "qlora"), dtype=("fp32", "bf16", "fp16"), zero=(None, 0, 1, 2, 3),
                       attention=("sdpa", "flash_attention_2", "eager"), offload=("none", "optimizer", "all"),
                       optimizer=("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"), device=("cuda", "cpu"))
        bad = [f"{k}={getattr(self, k)!r}: choose one of {', '.join(map(str, v))}" for k, v in choices.items()
               if getattr(self, k) not in v] + [f"{k}={getattr(self, k)}: must be at least 1" for k in (
                   "batch", "seq", "lora_r", "accumulation", "ranks") if getattr(self, k) < 1]
        bad += [f"lora_targets={self.lora_targets}: choose among {', '.join(PROJ)}"] * (
            not self.lora_targets or bool(set(self.lora_targets) - set(PROJ)))
        bad += ["ranks > 1 and offload need DeepSpeed: set zero (0-3)"] * (self.zero is None and (
            self.ranks > 1 or self.offload != "none")) + ["offload='all' (parameters too) needs zero=3"] * (
            self.offload == "all" and self.zero != 3)
        if bad:
            raise ValueError(bad[0])


def _bytes(s: Setup) -> dict[str, int]:
    """Bytes per element by role: weights w (QLoRA's unquantised ones are fp32 after k-bit preparation), compute a
    (autocast), projection outputs o (4-bit layers cast back to the input's dtype), adapters (fp32 in peft), dropout
    masks (bool on CUDA, float on CPU), LoRA's saved inputs l."""
    a = 4 if s.dtype == "fp32" else 2
    w = (2 if s.zero == 3 else 4) if s.method == "qlora" else (a if s.zero is None else 2)
    adapter = 4 if s.zero is None else 2
    b = dict(a=a, w=w, o=w if s.method == "qlora" else a, adapter=adapter, mask=1 if s.device == "cuda" else adapter,
             l=a if a == 2 else adapter, in_o=a, in_down=w if s.method == "qlora" else a)  # in_*: a group's input
    # without dropout, cast or autocast a LoRA target keeps its input itself, shared by the targets reading it
    return b | {"shared_" + g: int(s.lora_dropout == 0 and a == 4 and b.get("in_" + g, w) == adapter) for g in GROUPS}


def layer_terms(sh: Shapes, s: Setup) -> list[tuple[str, str, str, int]]:
    """(group, tag, tensor, bytes per token) one decoder layer keeps for backward when its input requires grad; frozen
    and 4-bit weights keep nothing per token (notebook 08 derives each term)."""
    b, C, M, r, H, full = _bytes(s), sh.hidden, sh.inter, s.lora_r, sh.heads, s.method == "full"
    Cq, Ckv, width = H * sh.head_dim, sh.kv_heads * sh.head_dim, {n: i for n, i, _, _ in sh.linear}
    terms = []
    for g in ("norm1", "norm2"):
        terms += [(g, "", "x in fp32, 1/rms", 4 * C + 4)] + [(g, "", "x normalised (weight grad)", C * b["w"])] * full
    if full:  # one input per group reading the same tensor; o_proj's input is sdpa's output (counted there)
        terms += [("attn_in", "", "q/k/v input", C * b["w"]), ("mlp_in", "", "gate/up input", C * b["w"]),
                  ("down", "", "down input", M * b["o"])]
    if s.attention == "eager":  # each matmul keeps the operand the other one's gradient needs
        rep = Cq if sh.kv_heads < H else Ckv
        terms += [("attn", "q", "q", Cq * b["a"]), ("attn", "k", "k (repeated)", rep * b["a"]),
                  ("attn", "v", "v (repeated)", rep * b["a"]), ("attn", "p", "softmax(qk) fp32", H * s.seq * 4)]
        terms += [("attn", "p16", "softmax 16-bit copy", H * s.seq * b["a"])] * (b["a"] != 4)
        terms += [("attn", "o_in", "o_proj input", Cq * b["a"])] * full
    else:
        terms += [("attn", "", "q, k, v, output", (2 * Cq + 2 * Ckv) * b["a"]), ("attn", "", "log-sum-exp", 4 * H)]
    terms += [("mlp", tag, f"{tag} (SwiGLU)", M * b["o"]) for tag in ("gate", "up", "silu(gate)")]
    seen = set()
    for t, g in [] if full else [(n, PROJ[n]) for n, *_ in sh.linear if n in s.lora_targets]:
        again = b["shared_" + g] and (g in seen or g == "o" and s.attention != "eager")  # o's is sdpa's output
        terms += [(g, "mask", f"{t} dropout mask", width[t] * b["mask"])] * (s.lora_dropout > 0)
        terms += [(g, "", f"{t} LoRA input, A·x", width[t] * b["l"] * (not again) + r * b["l"])]
        seen.add(g)
    return terms


def _saved(terms, skip=frozenset()) -> int:
    return sum(n for g, tag, _, n in terms if g not in skip and (g, tag) not in skip)


def _first_layer_skip(s: Setup) -> set:
    """What the first layer does not keep: a frozen embedding's output needs no grad, so nothing before the first LoRA
    target, nor its mask; a product keeps one factor only for the other's gradient (eager q·kᵀ, P·v; SwiGLU)."""
    if s.method == "full" or s.checkpointing:
        return set()
    first, t = GROUPS[min(GROUPS.index(PROJ[x]) for x in s.lora_targets)], set(s.lora_targets)
    qk = bool({"q_proj", "k_proj"} & t)
    p_for_v = "v_proj" in t and s.dtype == "fp32"  # in fp32, P·v keeps P itself (no 16-bit copy)
    keep = {"attn_in": {"q": "k_proj" in t, "k": "q_proj" in t, "p16": "v_proj" in t, "p": qk or p_for_v, "v": qk},
            "mlp_in": {"gate": "gate_proj" in t, "up": "gate_proj" in t, "silu(gate)": "up_proj" in t}}
    group = {"attn_in": "attn", "mlp_in": "mlp"}.get(first)
    return set(GROUPS[:GROUPS.index(first)]) | {(first, "mask")} | {
        (group, tag) for tag, kept in keep.get(first, {}).items() if not kept}


def nf4_bytes(numel: int, double_quant: bool = True, blocksize: int = 64) -> int:
    """Bytes bitsandbytes keeps for one NF4 weight: codes, absmax (8-bit + fp32 per 256), offset, code tables."""
    blocks = -(-numel // blocksize)
    constants = blocks + 4 * -(-blocks // 256) + 256 * 4 + 4 if double_quant else 4 * blocks
    return -(-numel // 2) + constants + 16 * 4


def model_states(params: int, ranks: int, stage: int, offload: str = "none", largest_layer: int = 0,
                 paper: bool = False) -> dict[str, float]:
    """Per-rank bytes of DeepSpeed mixed-precision model states for `params` trained parameters: 16-bit weight 2,
    16-bit gradient 2, fp32 gradient 4 (DeepSpeed's partition; the ZeRO paper, `paper=True`, omits it), fp32 master
    + Adam m, v 12. Stage 1 shards the fp32 part, 2 also the 16-bit gradients, 3 the 16-bit weights too and gathers a
    layer at a time (4 bytes per parameter of the largest). Offload puts fp32 part and gradients in CPU memory."""
    n = {k: ranks if stage >= k else 1 for k in (1, 2, 3)}  # divisor of what stage k shards
    g16 = 2 * params / n[2] if stage < 3 or paper else 0  # stage 3 reduces straight into the fp32 partition
    out = {"weights": 2 * params / n[3], "gradients": g16 + (0 if paper else 4 * params / n[1]),
           "optimizer states": 12 * params / n[1], "gathered layer": 4 * largest_layer * (stage == 3 and not paper)}
    if offload != "none":
        out.update({"gradients": 0, "optimizer states": 0} | ({"weights": 0} if offload == "all" else {}))
    return out


def _optimizer(sizes: list[int], nbytes: int, s: Setup) -> tuple[int, int]:
    """(state bytes, step temporaries): torch AdamW on CUDA (foreach) makes sqrt(v) of all tensors at once, on CPU
    sqrt(v) and v̂ of one (+ the previous denominator). bitsandbytes 8-bit: 1 byte + fp32 absmax per 256 (tensors of
    ≥ 4096). Paged states sit in unified memory, which the driver moves to the CPU under pressure."""
    if s.optimizer.endswith("8bit"):
        return sum(2 * (n + 4 * -(-n // 256)) if n >= 4096 else 8 * n for n in sizes), 0
    pairs = zip(sizes, [0] + sizes[:-1], strict=True)
    temp = nbytes * (sum(sizes) if s.device == "cuda" else max(2 * n + p for n, p in pairs))
    return 2 * nbytes * sum(sizes), 0 if s.optimizer.startswith("paged") else temp


# setup, parameter counts, bytes per device by part at the peak (sum: peak), that moment, every moment's total
Plan = namedtuple("Plan", "setup params trained parts moment moments peak")


def plan(model: str | Path | dict, **setup) -> Plan:
    """Peak memory per device of one training step (forward, backward, optimizer step), by part.

    Args:
        model: a bundled config name (a file in MODELS), a checkpoint directory or config.json, or a config dict.
        **setup: the fields of `Setup` (method, dtype, batch, seq, checkpointing, lora_targets, zero, ranks, ...)."""
    s, sh = Setup(**setup), shapes(model)
    b, full, ds, gc, eager = _bytes(s), s.method == "full", s.zero is not None, s.checkpointing, s.attention == "eager"
    N, L, C, M, V, T, H, D = s.batch * s.seq, sh.layers, sh.hidden, sh.inter, sh.vocab, s.seq, sh.heads, sh.head_dim
    w, a, o, lb = b["w"], b["a"], b["o"], b["l"]
    lora = {n: (s.lora_r * i, j * s.lora_r) for n, i, j, _ in sh.linear if n in s.lora_targets and not full}
    sizes = list(sh.order) if full else [x for _ in range(L) for n, *_ in sh.linear if n in lora for x in lora[n]]
    trained, g_bytes = sum(sizes), w if full else b["adapter"]

    def grads(names=tuple(PROJ)) -> int:  # gradient bytes of one layer's projections `names` (+ a norm, full)
        return ((sum(i * j + j * bias for n, i, j, bias in sh.linear if n in names) + C) * w if full else
                sum(sum(lora.get(n, ())) for n in names) * g_bytes)

    weights = sh.params * w + L * sum(nf4_bytes(i * j) - i * j * w for _, i, j, _ in sh.linear) * (s.method == "qlora")
    parts = {"weights": weights, "buffers": sh.buffers, "LoRA adapters": 0 if full else trained * g_bytes}
    g_head = (V * C * (2 - sh.tied) + C) * w * full
    g_layer, g_mlp, g_down = grads(), grads(("o_proj", "gate_proj", "up_proj", "down_proj")), grads(("down_proj",))
    if ds:  # DeepSpeed holds the trained parameters' states by stage; frozen weights shard at stage 3 only
        states = model_states(trained, s.ranks, s.zero, s.offload, max(V * C, M * C) * (s.zero == 3))
        frozen = 0 if full else weights / (s.ranks if s.zero == 3 else 1) * (s.offload != "all")
        parts.update({"weights": frozen + states.pop("weights"), "LoRA adapters": 0}, **states)
        all_grads = temp_opt = g_head = g_layer = g_mlp = g_down = 0
    else:
        parts["optimizer states"], temp_opt = _optimizer(sizes, g_bytes, s)
        all_grads = trained * g_bytes
        if s.accumulation > 1:  # earlier micro-batches' gradients stay through every moment
            parts["gradients"], all_grads, g_head, g_layer, g_mlp, g_down = all_grads, 0, 0, 0, 0, 0
    terms, skip0 = layer_terms(sh, s), _first_layer_skip(s)
    per_layer, first = _saved(terms), _saved(terms, skip0)
    casts = 2 * trained // L * (a == 2 and b["adapter"] == 4 and not full)  # autocast's copies of A and B
    fixed = 2 * T * D * w + 8 * T + 16 * N + s.batch * T * T * w * (eager and gc)  # cos/sin, positions, ids,
    ckpt = C * w * N  # labels, (checkpointing) eager's causal mask; a checkpoint: a layer's input

    def below(i: int) -> int:  # what the layers under layer i keep (checkpointing: their inputs and layer i's)
        return (i + 1) * ckpt if gc else (i > 0) * ((first + (i - 1) * per_layer) * N + i * casts)

    def backward(i: int, mlp: bool) -> dict:
        """Layer i's backward at its MLP (down_proj done; the residual's gradient + 3 of width M) or its attention."""
        skip = (skip0 if i == 0 and not gc else set()) | ({"down"} if mlp else {"norm2", "mlp_in", "mlp", "down", (
            "attn", "v"), ("attn", "p16"), ("attn", "o_in")})
        own = (_saved(terms, skip) - 4 * C * (gc and w == 4)) * N + casts  # gc: norm1's fp32 x is the input
        attn = H * D * a + (2 * H * T * 4 if eager else (H + 2 * sh.kv_heads) * D * a)
        return dict(activations=below(i) + own + fixed, temp=(C * w + (3 * M * o if mlp else attn)) * N,
                    grads=g_head + (L - 1 - i) * g_layer + (g_down if mlp else g_mlp))

    def forward(i: int, g: str) -> dict:
        """Layer i's forward (or recompute) at group g's last LoRA target: what it saved so far, what its code still
        references, the LoRA branch's own (input cast to fp32, dropout output, B·A·x scaled and added). A recompute
        stops at the last saved tensor (down_proj's A·x), starting where the backward first needs one (gradients held)."""
        skip = skip0 if i == 0 and not gc else set()
        names = [n for n, *_ in sh.linear if PROJ[n] == g]
        upto = names[:names.index([n for n in names if n in s.lora_targets][-1]) + 1]
        before = sum(n for gg, tag, name, n in terms if gg not in skip and (gg, tag) not in skip and (
            GROUPS.index(gg) < GROUPS.index(g) or gg == g and name.split()[0] in upto))
        _, width, out, _ = next(x for x in sh.linear if x[0] == upto[-1])
        kept = {n: w == 4 and n not in skip for n in ("norm1", "norm2")}  # residuals saved as the norms' fp32 x
        alive = 0 if b["shared_" + g] else {"attn_in": C * w, "mlp_in": C * w, "o": 0, "down": M * o}[g]  # input
        alive += sum(j for n, _, j, _ in sh.linear if n in upto) * o + M * o * (upto[-1] == "up_proj")  # outputs
        alive += C * w * ((g in ("o", "down")) + (not kept["norm1"] and not gc) + (g in ("mlp_in", "down") and not
                          kept["norm2"]) + (i > 0 and not gc and not (w == 4 and "norm1" not in skip0)))  # embeddings
        # peft casts the input to the adapters' fp32 (its 4-bit layer not under CUDA autocast, and it then casts B·A·x
        # back to the base output's dtype before adding: one more copy); a 16-bit lora_A copies the dropout output
        q4, cast = s.method == "qlora", not (s.method == "qlora" and a == 2 and s.device == "cuda")
        drop = b["adapter"] if cast else b.get("in_" + g, w)
        alive += width * b["adapter"] * (cast and b.get("in_" + g, w) != b["adapter"]) - 4 * C * (gc and w == 4)
        at_a = width * drop * (a == 2 and s.lora_dropout > 0 and drop != 2)
        tail = max(2 * lb, lb + o, 2 * o) if q4 and cast else max(2 * lb, lb + max(lb, o))
        alive += at_a if gc and g == "down" else max(at_a, out * tail)
        trigger = C * lb if "down_proj" in s.lora_targets else M * o * q4  # a 4-bit down_proj saves no tensor
        alive += (C * w + trigger) * gc
        mask = s.batch * T * T * w * (eager and not gc)  # eager's causal mask lives through the forward
        return dict(activations=below(i) + (before + alive) * N + casts + fixed + mask,
                    grads=(g_head + (L - 1 - i) * g_layer) * gc)

    saved = (L * ckpt if gc else (first + (L - 1) * per_layer) * N + L * casts) + fixed + (
        4 * C + 4 + 2 * C * w * full) * N  # + the final norm's (and lm_head's input, full)
    moments = {  # autocast keeps a 16-bit copy of an fp32 lm_head (QLoRA) until its backward
        "loss backward": dict(activations=saved + 8 * N + V * C * 2 * (a == 2 and w == 4), logits=12 * N * V),
        "final norm's backward": dict(activations=saved - (2 * C * w * full + 4) * N, grads=g_head, temp=20 * C * N),
        "top layer's MLP backward": backward(L - 1, True), "top layer's attention backward": backward(L - 1, False),
        "bottom layer's MLP backward": backward(0, True), "bottom layer's attention backward": backward(0, False),
        **{f"{'top' if i else 'bottom'} layer's {g} LoRA forward": forward(i, g) for i in {0, L - 1}
           for g in dict.fromkeys(PROJ[t] for t in s.lora_targets if not full)},
        "optimizer step": dict(grads=all_grads, temp=temp_opt),
    }
    base, moment = sum(parts.values()), max(moments, key=lambda k: sum(moments[k].values()))
    step = {k: moments[moment].get(key, 0) for k, key in (("gradients", "grads"), ("activations", "activations"),
                                                          ("logits and loss", "logits"), ("temporaries", "temp"))}
    parts = {k: int(parts.get(k, 0) + step.get(k, 0)) for k in {**parts, **step}}
    return Plan(s, sh.params, trained, parts, moment, {k: int(base + sum(v.values())) for k, v in moments.items()},
                sum(parts.values()))
