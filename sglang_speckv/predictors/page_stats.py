"""The default, self-contained predictor: each channel's mean and spread over the page.

For every (kv, layer, head, dim) channel of a page [2, layers, tokens, heads, dim], mu is
the mean of the channel's finite values over the page's tokens and sigma their RMS
deviation from that (rounded) mean. Both travel in the blob as side info, so encoder and
decoder use the same numbers whatever machine computed them.

Side info (little-endian), 3 bytes per channel, channels [kv, layers, heads, dim] in C
order: all means as bf16 (keeps any float range, decodes to float32 exactly), then all
sigmas as u8 codes on an eighth-of-an-octave grid, sigma = 2^(code/8 - 24): 2^-24 up to
2^7.9. A sigma off by at most 2^(1/16) (4.4%) costs ~0.003 bits/scalar; a byte instead of
a bf16 saves 0.125 bits/scalar on a 64-token page.
"""

from __future__ import annotations

import numpy as np
import torch

from sglang_speckv.predictors.base import PageMeta, Predictor, check_one_part

STEPS_PER_OCTAVE = 8
SIGMA_MIN_LOG2 = -24  # code 0; code 255 is 2^(255/8 - 24) = 2^7.875
# 2^(j/8) for j in 0..7, rounded to float32 once and written down, so that the decoder's
# sigma = EIGHTHS[code % 8] * 2^(code // 8 - 24) is an exact product on every device.
EIGHTHS = tuple(
    float.fromhex(h)
    for h in ("0x1p+0", "0x1.172b84p+0", "0x1.306fep+0", "0x1.4bfdaep+0",
              "0x1.6a09e6p+0", "0x1.8ace54p+0", "0x1.ae89fap+0", "0x1.d5818ep+0")
)  # fmt: skip
# sigma is floored relative to the channel mean: 2^-12 |mu| is below a quarter of an fp16
# ulp (2^-10 relative) and a 32nd of a bf16 one, so a constant channel costs well under a
# bit per scalar instead of the floor price of a sigma far smaller than its mean's error.
REL_SIGMA_FLOOR = 2.0**-12


def _channels(meta: PageMeta) -> int:
    kv, layers, _, heads, dim = meta.shape
    return kv * layers * heads * dim


def sigma_from_codes(codes: torch.Tensor) -> torch.Tensor:
    """u8 codes -> float32 sigma, exactly (a float32 constant times a power of two)."""
    c = codes.to(torch.int32)
    pow2 = (((c >> 3) + SIGMA_MIN_LOG2 + 127) << 23).view(torch.float32)  # 2^(c // 8 - 24)
    return torch.tensor(EIGHTHS, dtype=torch.float32)[c & 7] * pow2


class PageStatsPredictor(Predictor):
    """Per-channel page mean and RMS deviation, sent as side info (id 1, fingerprint 0)."""

    id = 1
    name = "page_stats"

    def side_info(self, values: torch.Tensor, meta: PageMeta) -> bytes:
        """values: [2, layers, tokens, heads, dim], the page in its storage dtype or float32
        (may hold NaN/inf: ignored), any device. Computed on the host in numpy
        (single-threaded: no thread-pool barriers per small op), one (kv, layer) block at a
        time: one transfer of the page as stored (none for a CPU page), float64 scratch of
        a block."""
        values = values.detach().cpu()
        kv, layers = values.shape[:2]
        mean_q = np.empty((kv * layers,) + tuple(values.shape[3:]), dtype=np.float32)  # bf16-exact
        sigma = np.empty(mean_q.shape, dtype=np.float64)
        for b in range(kv * layers):
            # [T, H, D]: sums over axis 0; exact from any storage dtype (NaN payloads ignored below)
            x = values[b // layers, b % layers].to(torch.float64).numpy()
            finite = np.isfinite(x)
            count = np.maximum(finite.sum(axis=0), 1)
            x[~finite] = 0.0
            mean = torch.from_numpy(x.sum(axis=0) / count).to(torch.bfloat16)  # what the decoder sees
            mean_q[b] = mean.to(torch.float32).numpy()
            x -= mean_q[b]
            x[~finite] = 0.0
            rms = np.sqrt(np.square(x).sum(axis=0) / count)
            sigma[b] = np.maximum(rms, np.abs(mean_q[b].astype(np.float64)) * REL_SIGMA_FLOOR)
        with np.errstate(divide="ignore"):
            code = (np.log2(sigma) - SIGMA_MIN_LOG2) * STEPS_PER_OCTAVE  # -inf for sigma = 0
        code = np.clip(np.round(np.nan_to_num(code, nan=0.0, neginf=0.0, posinf=255.0)), 0, 255).astype(np.uint8)
        means = torch.from_numpy(mean_q).to(torch.bfloat16).view(torch.int16).numpy().astype("<i2")
        return means.tobytes() + code.tobytes()

    def predict(
        self, meta: PageMeta, side: bytes, values: torch.Tensor, stage: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mu, sigma = self.predict_rows(meta, side, values, stage)
        return mu.reshape(-1), sigma.reshape(-1)

    def predict_rows(
        self, meta: PageMeta, side: bytes, values: torch.Tensor, stage: int, parts: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [kv * layers, tokens, heads * dim]: the channels' (mu, sigma) broadcast over
        the tokens (stride 0), nothing per symbol (so one part)."""
        check_one_part(self, parts)
        channels = _channels(meta)
        if len(side) != 3 * channels:
            raise ValueError(f"page_stats side info of {len(side)} bytes, expected {3 * channels}")
        means = np.frombuffer(side, dtype="<i2", count=channels).astype(np.int16)
        codes = np.frombuffer(side, dtype=np.uint8, offset=2 * channels)
        kv, layers, tokens, heads, dim = meta.shape
        shape = (kv * layers, 1, heads * dim)
        mu = torch.from_numpy(means).view(torch.bfloat16).to(torch.float32).view(shape)
        sigma = sigma_from_codes(torch.from_numpy(codes.copy())).view(shape)
        rows = (kv * layers, tokens, heads * dim)  # [kv * layers, tokens, heads * dim]
        return mu.to(values.device).expand(rows), sigma.to(values.device).expand(rows)
