"""The one configuration table of sglang-speckv, and its loader.

Every setting of the product is one row of ``FIELDS`` (or of ``TIER_FIELDS``, for the
entries of the ``tiers`` list): name, type, default, description. Adding a setting is adding
one row; ``Config`` and ``TierConfig`` are frozen dataclasses generated from the rows, and
``fields_markdown()`` renders the table for the docs (``speckv config --fields``).

A configuration comes from one TOML file (``examples/tiers.toml`` shows every default),
from a dict (SGLang's ``--hicache-storage-backend-extra-config`` JSON, where ``tiers`` is a
list of tables), or both: keys of the dict replace keys of the file (a ``tiers`` list is
replaced whole). It is validated once, at start-up; every error names the bad field, e.g.
``tiers[1].capacity: '12 parsecs' is not a size like '16GiB'``. Filesystem checks (the tier
directories exist or can be created, are writable, have room) happen when the store opens
them (storage/env.py), with the same field names.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the venv runs 3.11; pyproject pulls tomli in for 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and says what is expected."""


@dataclass(frozen=True)
class Kind:
    """A field type: its name in the docs, the Python type it produces, and its parser.

    ``parse(value, where)`` returns the validated value or raises ConfigError; ``where`` is
    the field's path (``tiers[1].capacity``) for the message.
    """

    name: str
    py_type: Any
    parse: Callable[[Any, str], Any]


@dataclass(frozen=True)
class Field:
    """One row of the configuration table. ``default`` is written the way a user writes the
    value in TOML (``"16GiB"``), and goes through the same parser; ``REQUIRED`` has none."""

    name: str
    kind: Kind
    default: Any
    description: str


REQUIRED = object()  # marker: the field has no default and must be given
LIVE = "live"  # the tier predictor that names the live calibration's (calibrate = "auto")


# --- kinds -------------------------------------------------------------------------------

def _parse_bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {value!r} is not a boolean (true or false)")
    return value


def _parse_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}: {value!r} is not a non-negative integer")
    return value


def _parse_float(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigError(f"{where}: {value!r} is not a non-negative number")
    return float(value)


def _parse_str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {value!r} is not a string")
    return value


# Decimal (kB = 1000) and binary (KiB = 1024) units, case-insensitive; a bare number is bytes.
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def format_size(n: float) -> str:
    """Bytes for people: '1.5 GiB', '640 MiB', '12 B'."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            v = n / scale
            return f"{v:.0f} {unit}" if abs(v) >= 100 else f"{v:.3g} {unit}"
    return f"{n:.0f} B"


def parse_size(value: Any, where: str = "size") -> int:
    """Bytes from ``"16GiB"``, ``"1.5 GB"``, ``"4096"`` or an integer (rounded down)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE_RE.match(value) if isinstance(value, str) else None
    unit = _SIZE_UNITS.get(match.group(2).lower()) if match else None
    if unit is None:
        raise ConfigError(f"{where}: {value!r} is not a size like '16GiB' (units: B, kB, MB, "
                          "GB, TB, KiB, MiB, GiB, TiB)")
    number = match.group(1)
    if "." in number:  # exact: integer part plus the fraction, both scaled, rounded down
        whole, frac = number.split(".")
        return int(whole) * unit + int(frac) * unit // 10 ** len(frac)
    return int(number) * unit


def _parse_path(value: Any, where: str) -> str:
    if value == "":  # not given (a tier kind without a directory)
        return ""
    path = os.path.expanduser(_parse_str(value, where))
    if "\0" in path:
        raise ConfigError(f"{where}: {value!r} contains a NUL byte; no file name can")
    if not os.path.isabs(path):
        raise ConfigError(f"{where}: {value!r} is not an absolute path")
    return os.path.normpath(path)


def choice(*options: str) -> Kind:
    """A string that must be one of ``options``."""

    def parse(value: Any, where: str) -> str:
        if value not in options:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(options)}")
        return value

    return Kind(" / ".join(repr(o) for o in options), str, parse)


def table_list(fields: tuple[Field, ...], cls: type) -> Kind:
    """A list of tables, each validated against ``fields`` into a ``cls`` instance."""

    def parse(value: Any, where: str) -> tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list of tables, got {value!r}")
        return tuple(cls(**_parse_table(item, fields, f"{where}[{i}]")) for i, item in enumerate(value))

    return Kind(f"list of {cls.__name__}", tuple, parse)


BOOL = Kind("bool", bool, _parse_bool)
INT = Kind("int", int, _parse_int)
FLOAT = Kind("float", float, _parse_float)
STR = Kind("str", str, _parse_str)
SIZE = Kind("size", int, parse_size)
PATH = Kind("path", str, _parse_path)


def _dataclass(name: str, fields: tuple[Field, ...]) -> type:
    """A frozen dataclass with one attribute per field (picklable: it lives in this module)."""
    cls = dataclasses.make_dataclass(name, [(f.name, f.kind.py_type) for f in fields], frozen=True)
    cls.__module__ = __name__
    return cls


# --- the table ---------------------------------------------------------------------------

TIER_FIELDS: tuple[Field, ...] = (
    Field("name", STR, REQUIRED, "label of the tier in stats and logs (unique)"),
    Field("kind", choice("lmdb", "mooncake"), "lmdb",
          "'lmdb': a local LMDB environment at 'path'; 'mooncake': a Mooncake Store cluster "
          "shared by several servers (storage/mooncake.py; at most one, the last tier; new "
          "pages are written through to it)"),
    Field("path", PATH, "",
          "directory of the tier's LMDB environment (created if missing; one directory per "
          "tier; required for 'lmdb')"),
    Field("capacity", SIZE, "16GiB",
          "bytes of stored pages (values and their record headers) the tier may hold; "
          "over it, the coldest pages move to the next tier, or are dropped from the last. "
          "'mooncake': the cluster evicts by itself; this is only the share `speckv simulate` "
          "assumes"),
    Field("sync", choice("none", "data", "full"), "data",
          "durability of a commit: 'none' no fsync (RAM/tmpfs; after a reboot the tier is "
          "emptied), 'data' one fsync per commit (a power loss may undo the last commit), "
          "'full' data and metadata fsynced (durable); see docs/STORAGE.md"),
    Field("predictor", STR, "",
          "predictor pages are re-coded with when they move into this tier (same forms as the "
          "top-level predictor; e.g. 'model:CHECKPOINT_DIR' for a cold tier; 'live': the live "
          "calibration's, with calibrate = 'auto', once it is ready); '' keeps them as they are"),
)

# The settings of a tier of kind "mooncake" only (storage/mooncake.py, docs/STORAGE.md).
MOONCAKE_FIELDS: tuple[Field, ...] = (
    Field("master_address", STR, "127.0.0.1:50051", "'mooncake': host:port of mooncake_master's RPC"),
    Field("metadata_server", STR, "http://127.0.0.1:8080/metadata",
          "'mooncake': the transfer engine's metadata service (mooncake_master "
          "--enable_http_metadata_server), e.g. http://HOST:8080/metadata"),
    Field("metrics_url", STR, "",
          "'mooncake': the master's metrics page (http://HOST:METRICS_PORT/metrics), read by "
          "`speckv store` and stats for the cluster's occupancy; '' reads none"),
    Field("local_hostname", STR, "127.0.0.1",
          "'mooncake': this host's address as the other cluster members reach it"),
    Field("global_segment_size", SIZE, "0",
          "'mooncake': memory this server lends the cluster to hold pages (anyone's); 0 lends "
          "none (pages live in other members' segments, e.g. a `mooncake_client` daemon's: "
          "a server's segment goes away with the server)"),
    Field("local_buffer_size", SIZE, "64MiB",
          "'mooncake': the client's transfer buffer; put and get batches are split to move "
          "at most half of it per call (a page larger than the buffer is not stored)"),
    Field("protocol", choice("tcp", "rdma"), "tcp", "'mooncake': transfer protocol"),
    Field("on_unreachable", choice("error", "degraded"), "error",
          "'mooncake': when the master or metadata server cannot be reached at start-up: "
          "'error' stops with a message naming the setting; 'degraded' starts with the other "
          "tiers only and connects when the cluster comes up"),
)
TIER_FIELDS += MOONCAKE_FIELDS

TierConfig = _dataclass("TierConfig", TIER_FIELDS)

FIELDS: tuple[Field, ...] = (
    Field("tiers", table_list(TIER_FIELDS, TierConfig),
          [{"name": "ram", "path": "/dev/shm/speckv", "capacity": "16GiB", "sync": "none"}],
          "storage tiers, fastest first; new pages land in the first"),
    Field("promote_on_hit", BOOL, True,
          "a page read from a lower tier moves back to the first tier, opportunistically: at "
          "most a quarter of that tier's capacity per read, never growing its file past its "
          "soft bound"),
    Field("recency_flush_seconds", FLOAT, 1.0,
          "reads record their accesses in memory; they are written to the LRU index at the "
          "next write, or by a read once this many seconds have passed"),
    # Backend (sglang_speckv/sglang/adapter.py):
    Field("predictor", STR, "page_stats",
          "predictor new pages are coded with: 'page_stats', 'CALIB.safetensors[:NAME]' from "
          "`speckv calibrate`, or 'model:CHECKPOINT_DIR[?quant=..&exact=K&threads=N]', the served "
          "model re-run on the CPU (sglang_speckv/predictors, docs/DESIGN.md)"),
    Field("calibrate", choice("off", "auto"), "off",
          "'auto': fit the token-free calibrated predictor (context) from the first pages "
          "written, in a child process at the lowest CPU priority; new pages are coded with "
          "page_stats until then, with it after; saved beside the first tier and reused by a "
          "restart (docs/DESIGN.md \"Live calibration\"). Needs predictor = 'page_stats' and "
          "an 'lmdb' first tier"),
    Field("calibrate_sample_tokens", INT, 4096,
          "calibrate = 'auto': tokens of written pages the fit samples (at least 8); more cost "
          "memory (4096 SmolLM2 tokens: 94 MB of bf16 KV) and fit time for a slightly better fit"),
    Field("coding_batch_bytes", SIZE, "64MiB",
          "raw KV bytes the codec codes in one batch: larger batches are split, so the codec's "
          "scratch stays a small multiple of this (docs/DESIGN.md \"The coder\")"),
    Field("stats_file", STR, "",
          "file the backend rewrites with its stats as JSON (at most once a second, and at "
          "shutdown); '' writes none"),
)

# Keys of SGLang's extra-config dict that SGLang itself reads (the dynamic backend loader
# and the controller); load_config ignores them instead of calling them unknown.
SGLANG_EXTRA_CONFIG_KEYS = frozenset({"backend_name", "module_path", "class_name", "interface_v1"})


# --- loading -----------------------------------------------------------------------------

def _parse_table(table: Any, fields: tuple[Field, ...], where: str) -> dict[str, Any]:
    """Validate one table (dict) against ``fields``: unknown keys, missing required keys,
    each value's type. Returns {name: parsed value} with defaults filled in."""
    prefix = f"{where}." if where else ""
    if not isinstance(table, dict):
        raise ConfigError(f"{where or 'config'}: expected a table of settings, got {table!r}")
    names = [f.name for f in fields]
    for key in table:
        if key not in names:
            hint = difflib.get_close_matches(str(key), names, n=1)
            did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(f"{prefix}{key}: unknown setting{did_you_mean} "
                              f"(known: {', '.join(names)})")
    out = {}
    for f in fields:
        if f.name in table:
            value = table[f.name]
        elif f.default is REQUIRED:
            raise ConfigError(f"{prefix}{f.name}: missing (required; {f.description})")
        else:
            value = f.default
        out[f.name] = f.kind.parse(value, f"{prefix}{f.name}")
    return out


def _check(config: Any) -> None:
    """Rules across fields."""
    if not config.tiers:
        raise ConfigError("tiers: at least one tier is needed")
    seen_names: dict[str, int] = {}
    seen_paths: dict[str, int] = {}  # by the directory they resolve to (symlinks followed)
    for i, tier in enumerate(config.tiers):
        if tier.kind == "mooncake":
            if i != len(config.tiers) - 1:
                raise ConfigError(f"tiers[{i}].kind: a 'mooncake' tier must be the last tier "
                                  f"(there are {len(config.tiers)})")
            if tier.predictor:
                raise ConfigError(f"tiers[{i}].predictor: a 'mooncake' tier is written through "
                                  "with the pages as coded; re-coding is for 'lmdb' tiers only")
        elif not tier.path:
            raise ConfigError(f"tiers[{i}].path: missing (required for an 'lmdb' tier; "
                              "an absolute directory)")
        if tier.name in seen_names:
            raise ConfigError(f"tiers[{i}].name: {tier.name!r} is already "
                              f"tiers[{seen_names[tier.name]}]'s name")
        real = os.path.realpath(tier.path) if tier.path else ""
        if real and real in seen_paths:
            other = seen_paths[real]
            same = ("" if config.tiers[other].path == tier.path
                    else f" ({config.tiers[other].path!r} resolves to {real!r} too)")
            raise ConfigError(f"tiers[{i}].path: {tier.path!r} is already tiers[{other}]'s "
                              f"path{same}; each tier needs its own directory")
        if tier.capacity <= 0:
            raise ConfigError(f"tiers[{i}].capacity: must be more than 0 bytes")
        if tier.predictor == LIVE and config.calibrate != "auto":
            raise ConfigError(f"tiers[{i}].predictor: 'live' re-codes with the live calibration; "
                              "set calibrate = 'auto' (or name a predictor)")
        seen_names[tier.name] = i
        seen_paths[real] = i
    if config.calibrate == "auto":
        if config.predictor != "page_stats":
            raise ConfigError(f"predictor: {config.predictor!r} with calibrate = 'auto'; the live calibration "
                              "replaces page_stats for new pages once it is ready, so leave predictor at "
                              "'page_stats' (or set calibrate = 'off')")
        if config.tiers[0].kind != "lmdb":
            raise ConfigError("calibrate: 'auto' saves its calibration beside the first tier, which must be "
                              "an 'lmdb' tier")
        if config.calibrate_sample_tokens < 8:
            raise ConfigError(f"calibrate_sample_tokens: {config.calibrate_sample_tokens} is too few; "
                              "at least 8 (default 4096)")


Config = _dataclass("Config", FIELDS)


def load_config(toml_path: str | os.PathLike | None = None, overrides: dict | None = None) -> Any:
    """Validated, frozen ``Config`` from a TOML file and/or a dict (dict keys win).

    ``overrides`` is typically SGLang's ``storage_config.extra_config``; the keys SGLang
    reads itself (SGLANG_EXTRA_CONFIG_KEYS) are ignored. Raises ConfigError naming the
    first bad field.
    """
    table: dict[str, Any] = {}
    if toml_path is not None:
        try:
            with open(toml_path, "rb") as f:
                table = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"config file {os.fspath(toml_path)!r}: {e.strerror}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {os.fspath(toml_path)!r}: invalid TOML: {e}") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {os.fspath(toml_path)!r}: not UTF-8 text (byte "
                              f"{e.start}: {e.object[e.start:e.start + 1]!r}); TOML files are "
                              "UTF-8") from e
    for key, value in (overrides or {}).items():
        if key not in SGLANG_EXTRA_CONFIG_KEYS:
            table[key] = value
    config = Config(**_parse_table(table, FIELDS, ""))
    _check(config)
    return config


def default(name: str) -> Any:
    """The parsed default of top-level field ``name`` (for code that runs without a Config)."""
    field = next(f for f in FIELDS if f.name == name)
    return field.kind.parse(field.default, name)


def fields_markdown() -> str:
    """The configuration table as Markdown (for the docs and ``speckv config --fields``)."""
    rows = ["| field | type | default | description |", "|---|---|---|---|"]
    for prefix, fields in (("", FIELDS), ("tiers[].", TIER_FIELDS)):
        for f in fields:
            default = "(required)" if f.default is REQUIRED else f"`{f.default!r}`"
            rows.append(f"| `{prefix}{f.name}` | {f.kind.name} | {default} | {f.description} |")
    return "\n".join(rows)


def config_command(parser: argparse.ArgumentParser):
    """``speckv config [FILE]``: validate a configuration, print it resolved (JSON, sizes in
    bytes); ``--fields`` prints the table of fields instead."""
    parser.add_argument("file", nargs="?", help="TOML file (default: no file, the defaults)")
    parser.add_argument("--fields", action="store_true", help="print the table of fields (Markdown)")

    def run(args: argparse.Namespace) -> int:
        if args.fields:
            print(fields_markdown())
            return 0
        try:
            config = load_config(args.file)
        except ConfigError as e:
            print(f"speckv config: {e}", file=sys.stderr)
            return 1
        print(json.dumps(dataclasses.asdict(config), indent=1))
        return 0

    return run
