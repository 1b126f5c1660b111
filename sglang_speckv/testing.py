"""A real SGLang server for tests, benchmarks and demos: start, wait, talk, stop, kill.

    with SGLangServer(["--hicache-storage", "speckv", "--speckv-config", toml]) as server:
        out = server.generate("some prompt", max_new_tokens=8)
        server.flush_cache()

The server is started by ``speckv serve`` (sglang_speckv/sglang/serve.py: our defaults, the CPU
engine when there is no GPU), bound to 127.0.0.1 on a free port, in its own process group
(SGLang runs the scheduler and detokenizer as child processes), with its output in a log
file. Guarantees, so that a test can never hang CI:
- every HTTP call has a timeout;
- ``start()`` waits at most ``start_timeout`` seconds for ``/health``, and raises
  ``ServerError`` with the end of the log if the server dies or does not come up;
- ``stop()`` sends SIGTERM to the whole group, then SIGKILL after ``stop_timeout``;
  ``kill()`` sends SIGKILL at once (crash tests). Both are idempotent.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sglang_speckv.replay.client import Server, ServerError

# Measured on the 2-core CI machines: ready in 30-60 s (most of it the tokenizer manager's
# start); 300 s leaves room for a loaded machine without letting a broken start hang CI.
START_TIMEOUT_S = 300.0
# SGLang stops all its processes within ~5 s of SIGTERM.
STOP_TIMEOUT_S = 20.0
# One generate call of a few hundred tokens on CPU takes a few seconds; the first one of a
# fresh server (lazy initialisation) up to ~30 s.
REQUEST_TIMEOUT_S = 180.0
LOG_TAIL_CHARS = 6000


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SGLangServer:
    """One ``speckv serve`` process. ``args`` are speckv serve's (SGLang's pass through)."""

    def __init__(
        self,
        args: list[str],
        *,
        log_path: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
        start_timeout: float = START_TIMEOUT_S,
        stop_timeout: float = STOP_TIMEOUT_S,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = Server(self.url, REQUEST_TIMEOUT_S)
        self.args = [*args, "--port", str(self.port), "--host", "127.0.0.1"]
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="speckv-sglang-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.env = env or {}
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> SGLangServer:
        command = [sys.executable, "-m", "sglang_speckv", "serve", *self.args]
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(command)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env}, start_new_session=True,
            )
        start = time.monotonic()
        while time.monotonic() - start < self.start_timeout:
            if self.proc.poll() is not None:
                raise ServerError(f"SGLang exited with code {self.proc.returncode} while starting\n{self.log_tail()}")
            if self.client.healthy():
                self.startup_s = time.monotonic() - start
                return self
            time.sleep(1.0)
        self.kill()
        raise ServerError(f"SGLang not ready after {self.start_timeout:.0f} s\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM the process group; SIGKILL it if it is not gone after stop_timeout."""
        self._signal(signal.SIGTERM)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait(timeout=self.stop_timeout)
        self._signal(signal.SIGKILL)  # children that outlived the launcher

    def kill(self) -> None:
        """SIGKILL the whole process group now (a crash, for crash-safety tests)."""
        self._signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=self.stop_timeout)

    def _signal(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)  # start_new_session: the group id is the pid
        except ProcessLookupError:
            pass

    def __enter__(self) -> SGLangServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as e:
            return f"(no log: {e})"
        return f"--- last {chars} characters of {self.log_path} ---\n{text[-chars:]}"

    # --- HTTP (replay/client.py's Server; errors carry the end of the log) ----------------

    def post(self, path: str, payload: dict | None = None, timeout: float = REQUEST_TIMEOUT_S) -> dict:
        return self._logged(self.client.post, path, payload, timeout)

    def generate(self, prompt: str | list[int], max_new_tokens: int = 8, salt: str | None = None) -> dict:
        """``Server.generate_greedy``: greedy tokens, logprobs and cached tokens by tier."""
        return self._logged(self.client.generate_greedy, prompt, max_new_tokens, salt)

    def healthy(self) -> bool:
        return self.client.healthy()

    def flush_cache(self, timeout: float = 60.0) -> None:
        """Drop the device (L1) and host (L2) caches; L3 storage keeps its pages."""
        self._logged(self.client.flush_cache, timeout)

    def _logged(self, call, *args):
        try:
            return call(*args)
        except ServerError as e:
            raise ServerError(f"{e}\n{self.log_tail()}") from e


class MooncakeCluster:
    """A real local Mooncake Store cluster on loopback: ``mooncake_master`` (with its HTTP
    metadata server) and one ``mooncake_client`` daemon lending ``segment`` bytes of memory,
    which holds the pages (servers and test clients lend none: their pages outlive them).
    Each on free ports, in its own process group, logging to ``log_dir``.

        with MooncakeCluster(tmp_path, segment="64MiB") as cluster:
            tier = cluster.tier_config()          # a [[tiers]] table for the speckv config
            cluster.kill_master(); cluster.start_master()   # an outage (the index is lost)

    ``master_flags``: extra mooncake_master flags (e.g. a short ``--default_kv_lease_ttl``)."""

    def __init__(self, log_dir: str | os.PathLike, segment: str = "256MiB",
                 master_flags: tuple[str, ...] = ()):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.segment = segment
        self.master_flags = list(master_flags)
        self.rpc_port, self.http_port, self.metrics_port, self.client_port = (free_port() for _ in range(4))
        self.master_address = f"127.0.0.1:{self.rpc_port}"
        self.metadata_server = f"http://127.0.0.1:{self.http_port}/metadata"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.master: subprocess.Popen | None = None
        self.holder: subprocess.Popen | None = None

    @staticmethod
    def binary(name: str) -> str:
        """A Mooncake program: next to this Python (the venv's bin/), or on PATH."""
        import shutil

        path = Path(sys.executable).parent / name
        found = str(path) if path.exists() else shutil.which(name)
        if found is None:
            from sglang_speckv.storage.mooncake import INSTALL_HINT

            raise ServerError(f"{name} not found: {INSTALL_HINT}")
        return found

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        with open(self.log_dir / f"{name}.log", "ab") as log:
            return subprocess.Popen([self.binary(name), *args], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)

    def start_master(self, timeout: float = 60.0) -> None:
        self.master = self._spawn("mooncake_master", [
            f"--rpc_port={self.rpc_port}", "--rpc_address=127.0.0.1",
            "--enable_http_metadata_server=true", "--http_metadata_server_host=127.0.0.1",
            f"--http_metadata_server_port={self.http_port}", f"--metrics_port={self.metrics_port}",
            *self.master_flags])
        self._wait(lambda: self.metrics() is not None, self.master, "mooncake_master", timeout)

    def start(self, timeout: float = 60.0) -> MooncakeCluster:
        self.start_master(timeout)
        from sglang_speckv.config import parse_size

        self.holder = self._spawn("mooncake_client", [
            "--host=127.0.0.1", f"--port={self.client_port}", f"--global_segment_size={parse_size(self.segment)}",
            f"--master_server_address={self.master_address}", f"--metadata_server={self.metadata_server}"])
        self.wait_mounted(timeout)
        return self

    def wait_mounted(self, timeout: float = 60.0) -> None:
        """Wait until the holder's segment is mounted on the (possibly restarted) master."""
        self._wait(lambda: (self.metrics() or {}).get("cluster_capacity", 0) > 0, self.holder,
                   "mooncake_client", timeout)

    def _wait(self, ready, proc: subprocess.Popen, name: str, timeout: float) -> None:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if proc.poll() is not None:
                raise ServerError(f"{name} exited with code {proc.returncode}; see {self.log_dir}/{name}.log")
            if ready():
                return
            time.sleep(0.2)
        self.stop()
        raise ServerError(f"{name} not ready after {timeout:.0f} s; see {self.log_dir}/{name}.log")

    def metrics(self) -> dict | None:
        from sglang_speckv.storage.mooncake import cluster_metrics

        return cluster_metrics(self.metrics_url)

    def tier_config(self, name: str = "cluster", **fields) -> dict:
        """A ``kind = "mooncake"`` tier table for this cluster."""
        return {"name": name, "kind": "mooncake", "master_address": self.master_address,
                "metadata_server": self.metadata_server, "metrics_url": self.metrics_url,
                "local_hostname": "127.0.0.1", **fields}

    def kill_master(self) -> None:
        """SIGKILL the master (an outage: its index of objects is lost with it)."""
        self._kill(self.master)

    @staticmethod
    def _kill(proc: subprocess.Popen | None) -> None:
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=STOP_TIMEOUT_S)

    def stop(self) -> None:
        self._kill(self.holder)
        self._kill(self.master)

    def __enter__(self) -> MooncakeCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
