"""GPTQ (Frantar et al. 2022): quantise a weight one input column at a time and push each
column's rounding error onto the columns not yet quantised, weighted by the inverse Hessian of
the layer's reconstruction loss ||WX - QX||^2 (H = 2 X X^T / n over calibration tokens).

The storage is exactly RTN's group-wise format (codes, scale, zero per group), so a GPTQ model
loads and runs with the same IntNLinear.
"""

from __future__ import annotations

import torch

from . import formats as fmt


class Hessian:
    """Running H = 2/n * sum_t x_t x_t^T over the tokens a linear sees (fp32 [K, K])."""

    def __init__(self, k: int, device=None):
        self.h = torch.zeros(k, k, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        self.h *= self.n / (self.n + m)
        self.n += m
        x = x * (2 / self.n) ** 0.5
        self.h += x.t() @ x


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    bits: int,
    group_size: int,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K], H [K, K] -> (codes uint8 [N, K], scale [N, G], zero [N, G]).

    damp: fraction of mean(diag H) added to the diagonal (keeps the Cholesky well posed).
    act_order: visit columns by decreasing diag(H) (the most active inputs first); the group
    parameters are then fixed up front from the original weight, so groups stay contiguous."""
    n, k = w.shape
    g = fmt.check_group(k, group_size)
    w = w.float().clone()
    h = h.float().clone()
    dead = torch.diag(h) == 0  # inputs never active: their columns cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0
    static = fmt.group_params(w, bits, g) if act_order else None
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, device=w.device)
    # Upper Cholesky factor of H^-1: row i holds the update coefficients for the columns after i.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    codes = torch.zeros(n, k, dtype=torch.uint8, device=w.device)
    scale = torch.zeros(n, k // g, device=w.device)
    zero = torch.zeros(n, k // g, device=w.device)
    if static is not None:
        scale, zero = static
    block_size = max(block_size // g, 1) * g  # whole groups per block: group params see updated weights
    for i1 in range(0, k, block_size):  # lazy batch updates: a block at a time, then one matmul
        i2 = min(i1 + block_size, k)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1, device=w.device), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            grp = col // g
            if static is None and col % g == 0:  # group parameters from the error-updated weights
                s, z = fmt.group_params(w1[:, i : i + g], bits, g)
                scale[:, grp], zero[:, grp] = s[:, 0], z[:, 0]
            q = torch.clamp(torch.round(w1[:, i] / scale[:, grp]) + zero[:, grp], 0, 2**bits - 1)
            codes[:, i1 + i] = q.to(torch.uint8)
            err = (w1[:, i] - (q - zero[:, grp]) * scale[:, grp]) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    codes = codes[:, torch.argsort(perm)]
    return codes, scale, zero
