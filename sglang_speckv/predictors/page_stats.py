"""The default, self-contained predictor: each channel's mean and spread over the page.

For every (kv, layer, head, dim) channel of a page [2, layers, tokens, heads, dim], mu is
the mean of the channel's finite values over the page's tokens and sigma their RMS
deviation from that (rounded) mean. Both travel in the blob as side info, so encoder and
decoder use the same numbers whatever machine computed them.

Side info (little-endian): bf16 means [kv, layers, heads, dim] in C order, then bf16 sigmas
in the same order; 4 bytes per channel. bf16 keeps any float range (an fp16 mean would
overflow on a bf16 page) and decodes to float32 exactly.
"""

from __future__ import annotations

import numpy as np
import torch

from sglang_speckv.predictors.base import PageMeta, Predictor

# sigma is floored relative to the channel mean: 2^-12 |mu| is below a quarter of an fp16
# ulp (2^-10 relative) and a 32nd of a bf16 one, so a constant channel costs well under a
# bit per scalar instead of the floor price of a sigma far smaller than its mean's error.
REL_SIGMA_FLOOR = 2.0**-12
# Absolute sigma floor, well below any KV value but above the coder's SIGMA_MIN.
ABS_SIGMA_FLOOR = 2.0**-40


def _channels(meta: PageMeta) -> tuple[int, int, int, int]:
    kv, layers, _, heads, dim = meta.shape
    return kv, layers, heads, dim


class PageStatsPredictor(Predictor):
    """Per-channel page mean and RMS deviation, sent as side info (id 1, fingerprint 0)."""

    id = 1
    name = "page_stats"

    def side_info(self, values: torch.Tensor, meta: PageMeta) -> bytes:
        """values: float32 [2, layers, tokens, heads, dim] (may hold NaN/inf: ignored)."""
        x = values.detach().to("cpu", torch.float64).permute(0, 1, 3, 4, 2)  # [kv, L, H, D, T]
        finite = torch.isfinite(x)
        count = finite.sum(dim=-1)
        safe = torch.where(finite, x, torch.zeros_like(x))
        mean = safe.sum(dim=-1) / count.clamp(min=1)
        mean_q = mean.to(torch.bfloat16)  # what the decoder will see
        dev = torch.where(finite, x - mean_q.to(torch.float64)[..., None], torch.zeros_like(x))
        rms = (dev.square().sum(dim=-1) / count.clamp(min=1)).sqrt()
        floor = (mean_q.to(torch.float64).abs() * REL_SIGMA_FLOOR).clamp(min=ABS_SIGMA_FLOOR)
        sigma = torch.maximum(rms, floor)
        sigma = torch.where(count > 0, sigma, torch.ones_like(sigma))  # no finite value: any
        sigma_q = sigma.to(torch.bfloat16)
        packed = torch.stack([mean_q, sigma_q]).contiguous()  # [2 (mean, sigma), kv, L, H, D]
        return packed.view(torch.int16).numpy().astype("<i2").tobytes()

    def predict(
        self, meta: PageMeta, side: bytes, values: torch.Tensor, stage: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kv, layers, heads, dim = _channels(meta)
        tokens = meta.shape[2]
        expected = 2 * 2 * kv * layers * heads * dim
        if len(side) != expected:
            raise ValueError(f"page_stats side info of {len(side)} bytes, expected {expected}")
        stats = torch.from_numpy(np.frombuffer(side, dtype="<i2").astype(np.int16)).view(torch.bfloat16)
        stats = stats.to(torch.float32).view(2, kv, layers, 1, heads, dim).to(values.device)
        shape = (kv, layers, tokens, heads, dim)
        mu = stats[0].expand(shape).reshape(-1)
        sigma = stats[1].expand(shape).reshape(-1)
        return mu, sigma
