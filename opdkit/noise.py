"""Sampling noise that lives on the model's device and does not depend on the batch.

``row_uniforms`` is the only source of randomness of HF sampling: a counter-based hash of (row seed,
position), evaluated with integer tensor ops wherever the keys live, so a GPU decode draws no noise on the host
and copies none per token, and a row samples the same tokens alone, in any batch, or on any rank.
``sample_with_uniforms`` turns one uniform per row into an exact draw from the row's softmax.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _splitmix64(x: int) -> int:
    """A 64-bit bijective mix (SplitMix64's finaliser), on the host: spreads small, adjacent seeds apart."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def noise_keys(seeds: list[int], device: torch.device | str) -> torch.Tensor:
    """(B, 2) int64 keys (two 32-bit halves of each row's mixed seed) on ``device``, for ``row_uniforms``."""
    mixed = [_splitmix64(int(s) % 2**64) for s in seeds]
    return torch.tensor([[m & _M32, m >> 32] for m in mixed], dtype=torch.long, device=device).reshape(-1, 2)


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h · c) mod 2^32 for h < 2^32, in int64 without overflow (c split into 16-bit halves)."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser (a bijection with full avalanche) on int64 tensors holding 32-bit values."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def row_uniforms(keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The sampling noise: one uniform in (0, 1) per (row, position), a pure function of (row key, position).

    Counter-based (a hash of the key and the counter, not a stateful generator), so it is computed with a few
    integer ops on ``keys.device`` (no host round trip, no per-row generator) and a row's noise does not depend
    on the other rows of its batch, on how rows are sharded over ranks, or on rows being dropped.

    Args:
        keys: (B, 2) int64 from ``noise_keys``.
        positions: (P,) int64 response positions, on the same device.
    Returns:
        (B, P) float64 with 52 random bits each: (x + 0.5) / 2^52 is exact and never 0 or 1.
    """
    lo, hi = keys[:, :1], keys[:, 1:]
    counter = _mix32((lo + positions[None, :] * 0x9E3779B9) & _M32)
    a = _mix32(hi ^ counter)
    b = _mix32(a ^ _mix32(lo ^ 0x68E31DA4))
    x = (a >> 6) * 2**26 + (b >> 6)
    return (x.double() + 0.5) / 2**52


def sample_with_uniforms(logprobs: torch.Tensor, u: torch.Tensor, block: int = 256) -> torch.Tensor:
    """Exact sampling from softmax by inverting each row's CDF at its uniform. (B, V), (B,) -> (B,) ids.

    One uniform per row instead of B x V Gumbel draws. The CDF is taken in two levels so that it can be
    float64 (every id keeps its own interval, however small) without a float64 pass over V, which is slow on
    CPUs: block masses (V / block of them) pick the block, then the chosen block's own float64 CDF picks the
    id, at the same fraction of the block's mass. ``searchsorted`` (left) returns the first entry reaching the
    target, so an id or block of probability 0 (top-p, min_new_tokens) is never returned.
    """
    B, V = logprobs.shape
    nb = -(-V // block)
    blocks = torch.nn.functional.pad(logprobs.exp(), (0, nb * block - V)).view(B, nb, block)
    block_cdf = blocks.sum(-1).double().cumsum(-1)  # (B, nb)
    target = (u * block_cdf[:, -1])[:, None]
    b = torch.searchsorted(block_cdf, target).clamp_max(nb - 1)  # (B, 1)
    start = torch.where(b > 0, block_cdf.gather(-1, (b - 1).clamp_min(0)), torch.zeros_like(target))
    # target lies in (start, cdf[b]], so the block's mass is > 0 and the fraction is in (0, 1]
    frac = ((target - start) / (block_cdf.gather(-1, b) - start)).clamp(max=1.0)
    inner = blocks.gather(1, b[:, :, None].expand(B, 1, block)).squeeze(1).double().cumsum(-1)  # (B, block)
    j = torch.searchsorted(inner, frac * inner[:, -1:]).clamp_max(block - 1)
    return (b * block + j).squeeze(-1).clamp_max(V - 1)
