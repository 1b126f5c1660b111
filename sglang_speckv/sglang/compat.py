"""The exact SGLang release sglang-speckv is built and tested against.

Everything in sglang_speckv that touches SGLang's private names (the CPU compatibility
patches, the backend registration) is checked against this version by
tests/test_sglang_smoke.py, which fails loudly when an upgrade moves them.
"""

SGLANG_VERSION = "0.5.23"
