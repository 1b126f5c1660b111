"""Offline commands a server never imports: dump-kv, calibrate, compress/decompress,
prepare-model, the frontier bench and the offline model predictors it measures."""
