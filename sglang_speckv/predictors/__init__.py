"""Predictors: per-scalar (mu, sigma) estimates of a KV page. See base.py for the contract.

- page_stats.py: self-contained (statistics travel in the blob), id 1.
- linear.py: token-free predictors calibrated to a model (calibration.py holds the file
  format, sglang_speckv/tools/calibrate.py the fitting): static, static_rope, prev_layer,
  context.
- live.py: live calibration (fit those predictors from the pages a server writes).
- model.py: the served model (optionally a quantised copy) re-run on the CPU on the
  page's tokens and every token before it, id 6 (``model:CHECKPOINT[?...]``).
- Early exit + linear probes are offline measurements: sglang_speckv/tools/model_predictors.py.

``predictor_from_spec`` is the one parser of a predictor spec string (the configuration's
``predictor`` fields, ``speckv compress --calib``).
"""

from __future__ import annotations

# The calibrated predictor used when a calibration file is named without a predictor name.
DEFAULT_CALIBRATED = "context"
PAGE_STATS = "page_stats"


class PredictorSpecError(ValueError):
    """A predictor spec that names nothing usable; the message says what to write."""


def predictor_from_calibration(calib, name: str):
    """The calibrated predictor ``name`` (one of linear.SPECS) of a Calibration (or of the
    path of a calibration file). Raises CalibrationError if the calibration lacks it."""
    from sglang_speckv.predictors.calibration import Calibration, load_calibration
    from sglang_speckv.predictors.linear import LinearGaussianPredictor

    if not isinstance(calib, Calibration):
        calib = load_calibration(calib)
    return LinearGaussianPredictor(calib, name)


def predictor_from_spec(spec: str, predictor_id: int | None = None):
    """The predictor a spec names: ``page_stats``; ``model:CHECKPOINT_DIR[?k=v&...]``, the
    model predictor (predictors/model.py); or ``CALIB.safetensors[:NAME]``, predictor NAME
    of a calibration file written by ``speckv calibrate`` (without NAME: the one whose id
    is ``predictor_id``, e.g. a blob's, else DEFAULT_CALIBRATED).
    Raises PredictorSpecError with what to do."""
    if spec == PAGE_STATS:
        from sglang_speckv.predictors.page_stats import PageStatsPredictor

        return PageStatsPredictor()
    if spec.startswith("model:"):
        from sglang_speckv.predictors.model import ModelPredictor, ModelSpec

        try:
            return ModelPredictor(ModelSpec.parse(spec))
        except (ValueError, OSError) as e:
            raise PredictorSpecError(str(e)) from None
    from sglang_speckv.predictors.calibration import CalibrationError
    from sglang_speckv.predictors.linear import SPECS

    path, _, name = spec.partition(":")
    if not path.endswith(".safetensors"):
        raise PredictorSpecError(f"{spec!r} is neither {PAGE_STATS!r}, 'model:CHECKPOINT_DIR[?...]' nor a "
                                 "calibration file 'CALIB.safetensors[:NAME]' (write one with `speckv calibrate`)")
    if not name and predictor_id is not None:
        name = next((n for n, s in SPECS.items() if s.id == predictor_id), "")
    try:
        return predictor_from_calibration(path, name or DEFAULT_CALIBRATED)
    except CalibrationError as e:
        raise PredictorSpecError(str(e)) from None
