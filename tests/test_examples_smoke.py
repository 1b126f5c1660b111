"""The benchmark scripts run at their smallest shape (a smoke test, not a timing)."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_bench_kernels_smallest_shape():
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "bench_kernels.py"), "--pages", "1", "--tokens", "1", "--dtype", "bf16"],
        check=True, capture_output=True, text=True, timeout=600,
    ).stdout
    assert "| bf16 | table | 1 |" in out and "| bf16 | exact | 1 |" in out and "FAILED" not in out and out.count("| OK |") == 4, out


def test_make_dump_writes_a_dump(tmp_path):
    from safetensors.torch import load_file

    path = tmp_path / "kv.safetensors"
    subprocess.run(
        [sys.executable, str(EXAMPLES / "make_dump.py"), str(path), "--layers", "2", "--kv-heads", "1", "--tokens", "3", "--head-dim", "4"],
        check=True, timeout=300,
    )
    kv = load_file(str(path))
    assert kv["k"].shape == kv["v"].shape == (2, 1, 3, 4)


@pytest.mark.parametrize("kv_dtype", ["bf16", "fp8_e4m3"])
def test_bench_restore_smallest_shape(kv_dtype):
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "bench_restore.py"), "--tokens", "64", "--layers", "1", "--page-tokens", "32",
         "--kv-dtype", kv_dtype],
        check=True, capture_output=True, text=True, timeout=900,
    ).stdout
    assert f"KV stored as {kv_dtype}" in out
    assert "| restore, page_stats |" in out and "| restore, static |" in out and "| raw copy" in out
    assert "| start-up warm-up" in out and "| first restore after start-up, page_stats |" in out


def test_gpu_session_script_parses_and_explains_itself():
    script = EXAMPLES / "gpu_session.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "bash examples/gpu_session.sh run [STEP...]" in usage.stdout


def test_estimate_sm90_smallest_shape():
    """Compiles the decode kernels for sm_90 (no GPU), splits their step loops into paths and
    counts probes with the interpreted kernel on small synthetic pages: the exact model's
    rows for both dtypes, the table model's for bf16, the hit paths split by part."""
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "estimate_sm90.py"), "--symbols", "4096", "--baseline", "none"],
        check=True, capture_output=True, text=True, timeout=600,
    ).stdout
    rows = [line for line in out.splitlines() if line.startswith("| synthetic Gaussian")]
    assert len(rows) == 3 and "| bf16 | - |" in out and "| fp8_e4m3 | - |" in out, out
    assert "The table model" in out and rows[-1].startswith("| synthetic Gaussian, 4096 symbols | bf16 |"), out
    assert "| level 1 (row, lookup, one step) |" in out and "| C(guess), C(guess + 1) |" in out, out  # the parts
