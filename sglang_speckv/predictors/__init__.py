"""Predictors: per-scalar (mu, sigma) estimates of a KV page. See base.py for the contract.

- page_stats.py: self-contained (statistics travel in the blob), id 1.
- linear.py: token-free predictors calibrated to a model (calibration.py holds the file
  format, sglang_speckv/tools/calibrate.py the fitting): static, static_rope, prev_layer, context.
- live.py: live calibration (fit those predictors from the pages a server writes).
- model.py: model predictors (the target's quantised weights, early exit + linear probes),
  measured offline by sglang_speckv/bench_frontier.py.
"""

from __future__ import annotations


# The calibrated predictor used when a calibration file is named without a predictor name.
DEFAULT_CALIBRATED = "context"


def predictor_from_calibration(calib, name: str):
    """The calibrated predictor ``name`` (one of linear.SPECS) of a Calibration (or of the
    path of a calibration file). Raises CalibrationError if the calibration lacks it."""
    from sglang_speckv.predictors.calibration import Calibration, load_calibration
    from sglang_speckv.predictors.linear import LinearGaussianPredictor

    if not isinstance(calib, Calibration):
        calib = load_calibration(calib)
    return LinearGaussianPredictor(calib, name)
