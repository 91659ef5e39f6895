"""Tiled ("flash") attention from scratch, plugged into transformers by name; the seed's --flash_attn switch done right.

    from lorakit.attention import choose_attention, register, tiled_attention
    name, why = choose_attention(flash_attn=True)        # "flash_attention_2" on CUDA + flash-attn, else a fallback
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=name)

Attention is softmax(q kᵀ / √d) v. Computed naively it builds the L×L score matrix per head: 4·L² bytes in fp32, 64 MiB
per head at L = 4096. The online softmax (Milakov & Gimelshein 2018; FlashAttention, Dao et al. 2022) visits the keys
block by block and keeps, for every query, a running max m, a running sum ℓ and an unnormalised output acc:

    m' = max(m, rowmax(S_j))      ℓ' = ℓ·e^(m−m') + rowsum(e^(S_j−m'))      acc' = acc·e^(m−m') + e^(S_j−m') V_j

and returns acc/ℓ, so only a block of scores exists at a time. The backward pass recomputes each block from q, k and
the saved (m, ℓ) instead of storing the probabilities: dP = dO Vᵀ, dS = P ∘ (dP − rowsum(dO ∘ O)), dQ = dS K / √d,
dK = dSᵀ Q / √d, dV = Pᵀ dO — memory stays linear in L for training too.

`register()` makes it selectable as attn_implementation="lorakit_tiled" in any model that dispatches through
transformers' AttentionInterface. Masked scores are set to the dtype's minimum, as transformers' eager attention does,
so a query that sees no key at all (a left-padding position, whose output is never used) gets a finite average of the
values it visited instead of NaN.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

DEFAULT_NAME = "lorakit_tiled"


def _visible(key_mask: torch.Tensor | None, full_mask: torch.Tensor | None, causal: bool, offset: int,
             i0: int, i1: int, j0: int, j1: int, device: torch.device) -> torch.Tensor | None:
    """Which scores of the block (queries i0:i1, keys j0:j1) are kept; None when all are. Broadcasts to (B, Hkv, G, bq, bk)."""
    vis = None
    if causal and j1 - 1 > offset + i0:  # the block reaches above the diagonal (query i sees keys ≤ i + offset)
        rows, cols = torch.arange(i0, i1, device=device), torch.arange(j0, j1, device=device)
        vis = (cols[None, :] <= rows[:, None] + offset)[None, None, None]  # (1, 1, 1, bq, bk)
    if key_mask is not None:
        keys = key_mask[:, None, None, None, j0:j1]  # (B, 1, 1, 1, bk)
        vis = keys if vis is None else vis & keys
    if full_mask is not None:
        block = full_mask[..., i0:i1, j0:j1]  # (B, 1|Hkv, 1|G, bq, bk)
        vis = block if vis is None else vis & block
    return vis


class _TiledAttention(torch.autograd.Function):
    """Forward and backward of tiled attention on grouped heads: q (B, Hkv, G, Lq, D), k and v (B, Hkv, Lk, D).

    The G query heads that share a key/value head are stacked along the rows of one matrix product, so k and v are
    never repeated and every product is a plain batched matmul over (B, Hkv).
    """

    @staticmethod
    def forward(ctx, q, k, v, key_mask, full_mask, causal: bool, scale: float, block: int):
        B, Hkv, G, Lq, D = q.shape
        Lk, offset, low = k.shape[-2], k.shape[-2] - q.shape[-2], torch.finfo(q.dtype).min
        out = torch.empty_like(q)  # (B, Hkv, G, Lq, D)
        m_all = q.new_empty(B, Hkv, G, Lq)  # running max of each query row
        sum_all = q.new_empty(B, Hkv, G, Lq)  # running sum of exponentials of each query row
        for i0 in range(0, Lq, block):
            i1 = min(i0 + block, Lq)
            rows = G * (i1 - i0)
            qi = (q[..., i0:i1, :] * scale).reshape(B, Hkv, rows, D)  # (B, Hkv, G·bq, D)
            m = q.new_full((B, Hkv, rows), low)
            total = q.new_zeros(B, Hkv, rows)
            acc = q.new_zeros(B, Hkv, rows, D)
            for j0 in range(0, min(Lk, offset + i1) if causal else Lk, block):
                j1 = min(j0 + block, Lk)
                s = qi @ k[:, :, j0:j1].transpose(-1, -2)  # (B, Hkv, G·bq, bk): the only scores that exist
                vis = _visible(key_mask, full_mask, causal, offset, i0, i1, j0, j1, q.device)
                if vis is not None:
                    s.view(B, Hkv, G, i1 - i0, j1 - j0).masked_fill_(~vis, low)
                m_new = torch.maximum(m, s.amax(-1))
                p = s.sub_(m_new[..., None]).exp_()  # in place: no second block-sized tensor
                correction = torch.exp(m - m_new)
                total = total * correction + p.sum(-1)
                acc = acc.mul_(correction[..., None]).add_(p @ v[:, :, j0:j1])
                m = m_new
            out[..., i0:i1, :] = (acc / total[..., None]).view(B, Hkv, G, i1 - i0, D)
            m_all[..., i0:i1] = m.view(B, Hkv, G, i1 - i0)
            sum_all[..., i0:i1] = total.view(B, Hkv, G, i1 - i0)
        ctx.save_for_backward(q, k, v, out, m_all, sum_all, key_mask, full_mask)
        ctx.causal, ctx.scale, ctx.block = causal, scale, block
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, m_all, sum_all, key_mask, full_mask = ctx.saved_tensors
        causal, scale, block = ctx.causal, ctx.scale, ctx.block
        B, Hkv, G, Lq, D = q.shape
        Lk, offset, low = k.shape[-2], k.shape[-2] - q.shape[-2], torch.finfo(q.dtype).min
        delta = (d_out * out).sum(-1)  # (B, Hkv, G, Lq): rowsum(dO ∘ O)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for i0 in range(0, Lq, block):
            i1 = min(i0 + block, Lq)
            rows = G * (i1 - i0)
            qi = (q[..., i0:i1, :] * scale).reshape(B, Hkv, rows, D)  # (B, Hkv, G·bq, D)
            doi = d_out[..., i0:i1, :].reshape(B, Hkv, rows, D)
            m, total, di = (t[..., i0:i1].reshape(B, Hkv, rows, 1) for t in (m_all, sum_all, delta))
            dqi = q.new_zeros(B, Hkv, rows, D)
            for j0 in range(0, min(Lk, offset + i1) if causal else Lk, block):
                j1 = min(j0 + block, Lk)
                kj, vj = k[:, :, j0:j1], v[:, :, j0:j1]  # (B, Hkv, bk, D)
                s = qi @ kj.transpose(-1, -2)  # (B, Hkv, G·bq, bk), recomputed instead of stored
                vis = _visible(key_mask, full_mask, causal, offset, i0, i1, j0, j1, q.device)
                if vis is not None:
                    s.view(B, Hkv, G, i1 - i0, j1 - j0).masked_fill_(~vis, low)
                p = s.sub_(m).exp_().div_(total)  # the probabilities of the forward pass
                dv[:, :, j0:j1] += p.transpose(-1, -2) @ doi  # the sum over the G heads happens in the product
                ds = p.mul_(doi @ vj.transpose(-1, -2) - di)  # (B, Hkv, G·bq, bk), overwrites p
                if vis is not None:
                    ds.view(B, Hkv, G, i1 - i0, j1 - j0).masked_fill_(~vis, 0.0)  # a masked score is a constant
                dqi += ds @ kj
                dk[:, :, j0:j1] += ds.transpose(-1, -2) @ qi  # qi carries the scale already
            dq[..., i0:i1, :] = (dqi * scale).view(B, Hkv, G, i1 - i0, D)
        return dq, dk, dv, None, None, None, None, None


def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                    mask: torch.Tensor | None = None, scale: float | None = None, block: int = 256) -> torch.Tensor:
    """softmax(q kᵀ·scale + mask) v, block by block with the online softmax; never builds the Lq×Lk score matrix.

    Args:
        q: queries (B, H, Lq, D).
        k, v: keys and values (B, Hkv, Lk, D); H must be a multiple of Hkv (grouped-query attention: each group of
            H/Hkv query heads shares one key/value head, without copying k and v).
        causal: query i sees keys j ≤ i + (Lk − Lq) (aligned at the end, as with a key/value cache).
        mask: None; a key-padding mask (B, Lk), True = attend; or a full boolean mask (B, 1|H, Lq, Lk), True = attend
            (combined with `causal`).
        scale: score scale, default 1/√D.
        block: queries and keys per tile; the largest score tensor is (B, H, block, block).

    Returns:
        (B, H, Lq, D), differentiable in q, k, v (a custom backward that recomputes each block).
    """
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"expected q (B, H, Lq, D) and k, v (B, Hkv, Lk, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if H % Hkv:
        raise ValueError(f"{H} query heads cannot share {Hkv} key/value heads: H must be a multiple of Hkv")
    if causal and Lk < Lq:
        raise ValueError(f"causal attention needs at least as many keys as queries (Lk={Lk} < Lq={Lq})")
    if block < 1:
        raise ValueError(f"block must be a positive number of tokens, got {block}")
    key_mask = full_mask = None
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be boolean (True = attend), got {mask.dtype}; for a 0/-inf additive mask "
                             "pass `mask == 0`")
        if mask.ndim == 2 and mask.shape == (B, Lk):
            key_mask = mask
        elif mask.ndim == 4 and mask.shape[0] == B and mask.shape[1] in (1, H) and mask.shape[2:] == (Lq, Lk):
            full_mask = mask.reshape(B, Hkv, H // Hkv, Lq, Lk) if mask.shape[1] == H else mask[:, :, None]
        else:
            raise ValueError(f"mask of shape {tuple(mask.shape)} fits neither (B, Lk) = ({B}, {Lk}) nor "
                             f"(B, 1|H, Lq, Lk) = ({B}, 1|{H}, {Lq}, {Lk})")
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype  # softmax statistics in fp32
    qg = q.to(work).reshape(B, Hkv, H // Hkv, Lq, D)  # (B, Hkv, G, Lq, D)
    kg, vg = k.to(work), v.to(work)  # (B, Hkv, Lk, D): shared by each group of G query heads
    out = _TiledAttention.apply(qg, kg, vg, key_mask, full_mask, causal, D**-0.5 if scale is None else scale, block)
    return out.reshape(B, H, Lq, D).to(q.dtype)


def tiled_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature around tiled_attention.

    Args:
        query (B, H, L, D), key and value (B, Hkv, S, D); attention_mask from tiled_mask(): None, (B, S) or (B, 1, L, S).

    Returns:
        ((B, L, H, D), None): no attention weights, they are never materialised.
    """
    if dropout:
        raise ValueError(f"lorakit_tiled has no attention dropout (got {dropout}): set config.attention_dropout=0.0 "
                         "or use attn_implementation='sdpa'")
    if kwargs.get("softcap") or kwargs.get("sinks") is not None:
        raise ValueError("lorakit_tiled supports neither logit soft-capping nor attention sinks: use 'eager' or 'sdpa'")
    causal = getattr(module, "is_causal", True) and (attention_mask is None or attention_mask.ndim == 2)
    out = tiled_attention(query, key, value, causal=causal, mask=attention_mask, scale=scaling)  # (B, H, L, D)
    return out.transpose(1, 2).contiguous(), None


def tiled_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
               mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """The mask function paired with lorakit_tiled in AttentionMaskInterface.

    Plain causal attention over the whole cache (the usual case) gets the compact key-padding mask (B, S) — or None
    without padding — and the kernel applies causality itself, like flash_attention_2. Anything else (sliding windows,
    packed sequences, static caches) gets transformers' full boolean mask (B, 1, L, S) built by sdpa_mask.
    """
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    plain = (mask_function in (None, causal_mask_function) and kv_offset == 0 and not torch.is_tensor(q_offset)
             and q_offset + q_length == kv_length
             and (attention_mask is None or attention_mask.shape[-1] == kv_length))
    if plain:
        return None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
    kwargs["allow_is_causal_skip"] = False  # the kernel must see every masked position in this mask
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset,
                     mask_function=mask_function or causal_mask_function, attention_mask=attention_mask, **kwargs)


def register(name: str = DEFAULT_NAME) -> str:
    """Make attn_implementation=name select tiled attention (AttentionInterface + AttentionMaskInterface). Idempotent.

    The mask function is not optional: without one, transformers hands the attention function attention_mask=None
    and padded batches come out silently wrong.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if "flash" in name:
        raise ValueError(f"attention name {name!r} contains 'flash': transformers then looks for a flash-attention "
                         f"kernel package instead of calling this function. Use a name such as {DEFAULT_NAME!r}")
    AttentionInterface.register(name, tiled_attention_forward)
    AttentionMaskInterface.register(name, tiled_mask)
    return name


def flash_attention_2_missing() -> str | None:
    """Why flash_attention_2 cannot run here (one sentence), or None when it can."""
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (flash-attn kernels run on NVIDIA GPUs only)"
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package is not installed (make setup-gpu, or pip install flash-attn)"
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        return "transformers does not accept the installed flash-attn (it needs flash-attn >= 2.3.3 and a CUDA torch)"
    return None


def choose_attention(flash_attn: bool) -> tuple[str, str | None]:
    """The seed's --flash_attn switch: (attn_implementation for from_pretrained, one-line fallback message or None).

    flash_attn=False keeps transformers' default, "sdpa". flash_attn=True gives "flash_attention_2" when a CUDA GPU
    and the flash-attn package are present (then cast the model with cast_for_flash_attention). Otherwise it falls
    back, saying why: on a GPU to "sdpa" (PyTorch's own fused kernels beat a Python loop there), on a CPU to
    "lorakit_tiled" (same memory behaviour as flash attention: linear in sequence length), registered here.
    """
    if not flash_attn:
        return "sdpa", None
    why = flash_attention_2_missing()
    if why is None:
        return "flash_attention_2", None
    if torch.cuda.is_available():
        return "sdpa", f"flash_attn requested but {why}: using 'sdpa' (PyTorch's fused attention) instead"
    return register(), (f"flash_attn requested but {why}: using '{DEFAULT_NAME}' (lorakit's tiled attention, same "
                        "linear memory in sequence length, pure PyTorch) instead")


def cast_for_flash_attention(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast norms, input embeddings and lm_head to `dtype` in place, as the seed did under --flash_attn; returns model.

    flash_attention_2 only accepts float16/bfloat16 activations, but k-bit preparation (peft's
    prepare_model_for_kbit_training) upcasts norms — and may leave embeddings and lm_head — in float32, which turns
    the hidden states float32. Quantised (integer) weights are left alone.

    Args:
        model: a transformers model (any architecture: norms are found by class name, embeddings and head by API).
        dtype: torch.float16 or torch.bfloat16 (bf16 on Ampere or newer).
    """
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"flash_attention_2 computes in float16 or bfloat16, got {dtype}: pass torch.bfloat16 "
                         "(Ampere or newer GPUs) or torch.float16")
    targets = [m for m in model.modules() if "norm" in type(m).__name__.lower()]
    if hasattr(model, "get_input_embeddings"):
        targets.append(model.get_input_embeddings())
    if hasattr(model, "get_output_embeddings"):
        targets.append(model.get_output_embeddings())
    for module in targets:
        if module is None:
            continue
        for param in module.parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(dtype)
    return model
