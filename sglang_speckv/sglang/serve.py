"""``speckv serve``: start a stock SGLang server with speckv as its HiCache L3 tier.

    speckv serve [SGLANG ARGS...] [--hicache-storage speckv|file|none] [--speckv-config F]
                 [--dry-run]

Every argument it does not know goes to ``python -m sglang.launch_server`` unchanged; the
defaults below are added only where the caller did not give the option. The process then
*becomes* the SGLang server (exec), so signals and exit codes are SGLang's own.

Defaults (each is what SGLang needs for speckv to work as intended):
- ``--model-path``: the SmolLM2-135M-Instruct checkpoint of ``speckv prepare-model``
  (built on first use).
- ``--enable-hierarchical-cache --hicache-storage-backend speckv`` (``--hicache-storage``
  picks ``file``, SGLang's own file backend, or ``none`` for baselines).
- ``--page-size``: 64 on a GPU (SGLang's own HiCache storage tests), 16 on the CPU engine
  (a SmolLM2 page is then 368 KiB, short prompts already span several pages).
- ``--hicache-storage-prefetch-policy wait_complete``: a request waits for its L3 pages,
  so hits do not depend on timing (deterministic tests and replays).
- extra config ``hicache_storage_pass_prefix_keys: true``: the backend learns each page's
  position from its prefix keys; merged into any ``--hicache-storage-backend-extra-config``
  JSON given. ``--speckv-config F`` adds ``config_file: F`` (the TOML of
  sglang_speckv/config.py; extra-config keys override the file's).
- extra config ``prefetch_threshold``: the page size, so that L3 serves every stored page
  a request lacks. SGLang's default (256 tokens) skips L3 whenever the part of a prompt
  beyond its device/host match is shorter than that: in multi-turn traffic, every session
  that arrives after another has put the shared system prompt on the device. The
  trade-off: docs/TUNING.md, "The prefetch threshold".
- ``--host 127.0.0.1``.
- No CUDA: SGLANG_USE_CPU_ENGINE=1 and the CPU-engine flags that work with our
  compatibility fixes (sglang_speckv/sglang/cpu_compat): ``--device cpu --attention-backend
  torch_native --disable-cuda-graph --hicache-io-backend direct --hicache-mem-layout
  layer_first --skip-server-warmup`` and ``--max-total-tokens 8192`` (the model's context
  length: one full-length request fits; SGLang would otherwise size the KV pool from free
  RAM).
- A local model directory: HF_HUB_OFFLINE=1 (nothing to download).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

STORAGE_CHOICES = ("speckv", "file", "none")
GPU_PAGE_SIZE = 64
CPU_PAGE_SIZE = 16
CPU_MAX_TOTAL_TOKENS = 8192
CPU_FLAGS = (
    ("--device", "cpu"),
    ("--attention-backend", "torch_native"),
    ("--disable-cuda-graph", None),
    ("--hicache-io-backend", "direct"),
    ("--hicache-mem-layout", "layer_first"),
    ("--skip-server-warmup", None),
    ("--max-total-tokens", str(CPU_MAX_TOTAL_TOKENS)),
)
EXTRA_CONFIG_FLAG = "--hicache-storage-backend-extra-config"


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _has(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def _value(args: list[str], flag: str) -> str | None:
    """VALUE of the last ``flag VALUE`` or ``flag=VALUE`` in ``args``, or None."""
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def _pop_value(args: list[str], flag: str) -> str | None:
    """Remove ``flag VALUE`` or ``flag=VALUE`` from ``args``; return VALUE (last wins)."""
    value = None
    i = 0
    while i < len(args):
        if args[i] == flag:
            if i + 1 >= len(args):
                raise SystemExit(f"speckv serve: {flag} needs a value")
            value = args[i + 1]
            del args[i : i + 2]
        elif args[i].startswith(flag + "="):
            value = args[i].split("=", 1)[1]
            del args[i]
        else:
            i += 1
    return value


def build_command(
    sglang_args: list[str],
    storage: str = "speckv",
    speckv_config: str | None = None,
    cpu: bool | None = None,
) -> tuple[list[str], dict[str, str]]:
    """(argv, environment additions) for ``python -m sglang.launch_server``.

    ``cpu``: run SGLang's CPU engine; None = when no CUDA device is visible."""
    if storage not in STORAGE_CHOICES:
        raise SystemExit(f"speckv serve: --hicache-storage must be one of {', '.join(STORAGE_CHOICES)}")
    args = list(sglang_args)
    env: dict[str, str] = {}
    cpu = (not cuda_available()) if cpu is None else cpu

    def default(flag: str, value: str | None = None) -> None:
        if not _has(args, flag):
            args.extend([flag] if value is None else [flag, value])

    if not _has(args, "--model-path"):
        from sglang_speckv.tools.prepare_model import prepare_model

        args.extend(["--model-path", str(prepare_model())])
    model = _value(args, "--model-path")
    if model and Path(model).expanduser().is_dir():
        env["HF_HUB_OFFLINE"] = "1"
    default("--host", "127.0.0.1")
    default("--page-size", str(CPU_PAGE_SIZE if cpu else GPU_PAGE_SIZE))
    if cpu:
        env["SGLANG_USE_CPU_ENGINE"] = "1"
        for flag, value in CPU_FLAGS:
            default(flag, value)
    if storage != "none":
        default("--enable-hierarchical-cache")
        default("--hicache-storage-prefetch-policy", "wait_complete")
        if _has(args, "--hicache-storage-backend"):
            raise SystemExit("speckv serve: pick the backend with --hicache-storage, not --hicache-storage-backend")
        args.extend(["--hicache-storage-backend", storage])
        extra_text = _pop_value(args, EXTRA_CONFIG_FLAG)
        if extra_text is not None and extra_text.startswith("@"):
            raise SystemExit(
                f"speckv serve: give a TOML file with --speckv-config; {EXTRA_CONFIG_FLAG} takes inline JSON here"
            )
        try:
            extra = json.loads(extra_text) if extra_text else {}
        except json.JSONDecodeError as e:
            raise SystemExit(f"speckv serve: {EXTRA_CONFIG_FLAG} is not valid JSON: {e}") from e
        extra.setdefault("hicache_storage_pass_prefix_keys", True)
        if "prefetch_threshold" not in extra:
            page_size = _value(args, "--page-size")
            if not page_size.isdigit():
                raise SystemExit(f"speckv serve: --page-size must be a positive integer, got {page_size!r}")
            extra["prefetch_threshold"] = int(page_size)
        if speckv_config:
            if storage != "speckv":
                raise SystemExit("speckv serve: --speckv-config applies to --hicache-storage speckv only")
            path = Path(speckv_config).expanduser().resolve()
            if not path.is_file():
                raise SystemExit(f"speckv serve: --speckv-config {speckv_config}: no such file")
            extra["config_file"] = str(path)
        args.extend([EXTRA_CONFIG_FLAG, json.dumps(extra)])
    elif speckv_config:
        raise SystemExit("speckv serve: --speckv-config needs --hicache-storage speckv")
    return [sys.executable, "-m", "sglang.launch_server", *args], env


def serve_command(parser):
    parser.usage = "speckv serve [SGLANG ARGS...] [--hicache-storage speckv|file|none] [--speckv-config FILE]"
    parser.add_argument("--hicache-storage", default="speckv", choices=STORAGE_CHOICES,
                        help="L3 tier: speckv (default), SGLang's file backend, or none")
    parser.add_argument("--speckv-config", default=None, help="TOML configuration of the speckv tiers")
    parser.add_argument("--cpu", action=argparse.BooleanOptionalAction, default=None,
                        help="force SGLang's CPU engine on (--cpu) or off (--no-cpu); default: on when no CUDA")
    parser.add_argument("--dry-run", action="store_true", help="print the SGLang command and exit")
    # Everything else is SGLang's: the CLI calls parser.parse_args, which we point at
    # parse_known_args so the unknown arguments are kept, in order, in args.sglang_args;
    # no abbreviations, so no SGLang option is ever mistaken for one of ours.
    parser.allow_abbrev = False
    parser.parse_args = _keep_unknown(parser)

    def run(args) -> int:
        argv, env = build_command(args.sglang_args, args.hicache_storage, args.speckv_config, args.cpu)
        shown = " ".join(f"{k}={v}" for k, v in env.items())
        print(f"[speckv serve] {shown} {shlex.join(argv)}".strip(), flush=True)
        if args.dry_run:
            return 0
        os.execve(sys.executable, argv, {**os.environ, **env})

    return run


def _keep_unknown(parser):
    known_parse = parser.parse_known_args

    def parse_args(argv=None, namespace=None):
        args, rest = known_parse(argv, namespace)
        args.sglang_args = rest
        return args

    return parse_args
