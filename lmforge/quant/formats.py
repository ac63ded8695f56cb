"""The quantization arithmetic, on plain tensors (no modules): symmetric per-channel intN,
group-wise asymmetric intN with zero points, NF4 with block-wise absmax and double-quantised
scales, and fake quantization with a straight-through estimator for QAT.

Shapes follow nn.Linear: a weight is [N out, K in]; groups run along K.
"""

from __future__ import annotations

import torch

from lmforge.common import LmforgeError

SCALE_DTYPE = torch.float16  # scales on disk: half the bytes of fp32, what HF GPTQ/AWQ files use


def sym_quantize(w: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel: w ~= q * scale[:, None], q in [-(2^(b-1)-1), 2^(b-1)-1] int8."""
    qmax = 2 ** (bits - 1) - 1
    scale = (w.float().abs().amax(dim=-1) / qmax).clamp(min=1e-8).to(SCALE_DTYPE).float()
    q = torch.round(w.float() / scale[:, None]).clamp(-qmax, qmax).to(torch.int8)
    return q, scale.to(SCALE_DTYPE)


def sym_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def check_group(k: int, group_size: int) -> int:
    """The effective group size along K: -1 or >= K means one group per row; when K is not a
    multiple of group_size, the largest divisor of K below it (a multiple of 8 if one exists), so
    odd widths (e.g. 176) still quantize. The choice is recorded per module in the quant config."""
    if group_size <= 0 or group_size >= k:
        return k
    divisors = [g for g in range(group_size, 0, -1) if k % g == 0]
    return next((g for g in divisors if g % 8 == 0), divisors[0])


def group_params(
    w: torch.Tensor, bits: int, group_size: int, clip: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min/max parameters per (row, group): scale [N, G] and integer zero [N, G].

    `clip` (scalar or [N, G]) shrinks the range, as AWQ's clipping search does."""
    n, k = w.shape
    wg = w.float().reshape(n, -1, group_size)
    lo, hi = wg.amin(-1) * clip, wg.amax(-1) * clip
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).clamp(min=1e-6).to(SCALE_DTYPE).float()
    zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale, zero


def group_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """w [N, K] -> q [N, K] uint8 in [0, 2^bits) given per-group scale/zero [N, G]."""
    n, k = w.shape
    g = k // scale.shape[-1]
    wg = w.float().reshape(n, -1, g)
    q = torch.round(wg / scale[..., None]) + zero[..., None]
    return q.clamp(0, 2**bits - 1).reshape(n, k).to(torch.uint8)


def group_dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    g = k // scale.shape[-1]
    w = (q.float().reshape(n, -1, g) - zero.float()[..., None]) * scale.float()[..., None]
    return w.reshape(n, k)


def rtn_group(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest group-wise: (q uint8 [N, K], scale [N, G], zero [N, G])."""
    g = check_group(w.shape[1], group_size)
    scale, zero = group_params(w, bits, g)
    return group_quantize(w, scale, zero, bits), scale, zero


# ----------------------------------------------------------------------------- NF4 (QLoRA)

# The 16 NormalFloat levels: quantiles of N(0, 1) rescaled to [-1, 1] with an exact zero.
# Source: Dettmers et al. 2023 (QLoRA), appendix E; the same table as bitsandbytes' NF4.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


def nf4_quantize(w: torch.Tensor, block_size: int = 64, scale_block: int = 256) -> dict[str, torch.Tensor]:
    """Block-wise absmax NF4 with double quantisation of the absmax values.

    Returns codes [numel] uint8 (0..15, packed by the caller), absmax_q int8 [blocks],
    absmax_scale fp32 [ceil(blocks / scale_block)], absmax_offset fp32 [] (the mean absmax)."""
    flat = w.float().reshape(-1)
    if flat.numel() % block_size:
        raise LmforgeError(f"NF4: weight with {flat.numel()} elements is not a multiple of block_size {block_size}")
    blocks = flat.reshape(-1, block_size)
    absmax = blocks.abs().amax(-1).clamp(min=1e-8)
    absmax_q, absmax_scale, offset = _double_quantize(absmax, scale_block)
    absmax = _double_dequantize(absmax_q, absmax_scale, offset, scale_block)  # quantise with what is stored
    code = torch.tensor(NF4_CODE, device=w.device)
    normed = (blocks / absmax[:, None]).clamp(-1, 1)
    codes = (normed[..., None] - code).abs().argmin(-1).to(torch.uint8)
    return {"codes": codes.reshape(-1), "absmax_q": absmax_q, "absmax_scale": absmax_scale, "absmax_offset": offset}


def nf4_dequantize(
    codes: torch.Tensor,
    absmax_q: torch.Tensor,
    absmax_scale: torch.Tensor,
    absmax_offset: torch.Tensor,
    block_size: int,
    scale_block: int,
) -> torch.Tensor:
    """Flat float weights from NF4 codes (reshape to [N, K] at the caller)."""
    absmax = _double_dequantize(absmax_q, absmax_scale, absmax_offset, scale_block)
    code = torch.tensor(NF4_CODE, device=codes.device)
    return (code[codes.long()].reshape(-1, block_size) * absmax[:, None]).reshape(-1)


def _double_quantize(absmax: torch.Tensor, scale_block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """absmax - mean, quantised to int8 symmetric per block of `scale_block` values (QLoRA's double quant)."""
    offset = absmax.mean()
    centred = absmax - offset
    pad = -centred.numel() % scale_block
    padded = torch.nn.functional.pad(centred, (0, pad)).reshape(-1, scale_block)
    scale = (padded.abs().amax(-1) / 127).clamp(min=1e-12)
    q = torch.round(padded / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(-1)[: absmax.numel()], scale, offset


def _double_dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, scale_block: int) -> torch.Tensor:
    idx = torch.arange(q.numel(), device=q.device) // scale_block
    return q.float() * scale[idx] + offset


# ----------------------------------------------------------------------------- QAT


def fake_quant(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Quantise-dequantise in the forward pass; the straight-through estimator passes the
    gradient to `w` unchanged (d round(x)/dx := 1), so training sees the rounding error."""
    g = check_group(w.shape[-1], group_size)
    with torch.no_grad():
        scale, zero = group_params(w.detach(), bits, g)
        wq = group_dequantize(group_quantize(w.detach(), scale, zero, bits), scale, zero).to(w.dtype)
    return w + (wq - w).detach()
