"""The configuration table and its loader (sglang_speckv/config.py)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from sglang_speckv.config import (
    FIELDS,
    MOONCAKE_FIELDS,
    TIER_FIELDS,
    ConfigError,
    fields_markdown,
    load_config,
    parse_size,
)

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiers.toml"


def test_defaults_one_ram_tier():
    config = load_config()
    assert [t.name for t in config.tiers] == ["ram"]
    ram = config.tiers[0]
    assert (ram.path, ram.capacity, ram.sync, ram.predictor) == ("/dev/shm/speckv", 16 << 30, "none", "")
    assert config.promote_on_hit is True
    assert config.recency_flush_seconds == 1.0


def test_example_file_shows_the_defaults():
    assert load_config(EXAMPLE) == load_config()
    # Every setting is spelled out in it (commented-out lines do not count).
    with open(EXAMPLE, "rb") as f:
        example = tomllib.load(f)
    assert set(example) == {f.name for f in FIELDS}
    assert set(example["tiers"][0]) == {f.name for f in TIER_FIELDS} - {f.name for f in MOONCAKE_FIELDS}


def test_config_is_frozen():
    config = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.promote_on_hit = False
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.tiers[0].capacity = 1


def test_toml_file_and_overrides(tmp_path):
    path = tmp_path / "speckv.toml"
    path.write_text(
        'promote_on_hit = false\n'
        '[[tiers]]\nname = "ram"\npath = "/dev/shm/x"\ncapacity = "1GiB"\nsync = "none"\n'
        '[[tiers]]\nname = "ssd"\npath = "/var/lib/x"\ncapacity = "2 TB"\npredictor = "strong"\n')
    config = load_config(path)
    assert config.promote_on_hit is False
    assert [(t.name, t.capacity, t.sync, t.predictor) for t in config.tiers] == [
        ("ram", 1 << 30, "none", ""), ("ssd", 2 * 10**12, "data", "strong")]
    # Overrides (SGLang's extra-config JSON) win key by key; a tiers list is replaced whole.
    extra = json.loads('{"promote_on_hit": true, "recency_flush_seconds": 0.5,'
                       ' "tiers": [{"name": "only", "path": "/tmp/only"}],'
                       ' "backend_name": "speckv", "module_path": "m", "class_name": "C",'
                       ' "interface_v1": 1}')
    config = load_config(path, extra)
    assert config.promote_on_hit is True and config.recency_flush_seconds == 0.5
    assert [(t.name, t.path, t.capacity) for t in config.tiers] == [("only", "/tmp/only", 16 << 30)]


@pytest.mark.parametrize("overrides, message", [
    ({"tiers": [{"name": "a", "path": "/a"}, {"name": "b", "path": "/b", "capacity": "12 parsecs"}]},
     "tiers[1].capacity: '12 parsecs' is not a size like '16GiB'"),
    ({"tiers": [{"name": "a", "path": "/a", "capacity": -5}]}, "tiers[0].capacity: -5 is not a size"),
    ({"tiers": [{"name": "a", "path": "/a", "capacity": 0}]}, "tiers[0].capacity: must be more than 0"),
    ({"tiers": [{"name": "a", "path": "relative/dir"}]},
     "tiers[0].path: 'relative/dir' is not an absolute path"),
    ({"tiers": [{"name": "a"}]}, "tiers[0].path: missing (required"),
    ({"tiers": [{"name": "a", "path": "/a", "sync": "sometimes"}]},
     "tiers[0].sync: 'sometimes' is not one of none, data, full"),
    ({"tiers": [{"name": "a", "path": "/a", "capcity": "1GiB"}]},
     "tiers[0].capcity: unknown setting; did you mean 'capacity'?"),
    ({"tiers": [{"name": "a", "path": "/a"}, {"name": "a", "path": "/b"}]},
     "tiers[1].name: 'a' is already tiers[0]'s name"),
    ({"tiers": [{"name": "a", "path": "/a"}, {"name": "b", "path": "/a/"}]},
     "tiers[1].path: '/a' is already tiers[0]'s path"),
    ({"tiers": []}, "tiers: at least one tier is needed"),
    ({"tiers": {"name": "a"}}, "tiers: expected a list of tables"),
    ({"tiers": ["ram"]}, "tiers[0]: expected a table of settings"),
    ({"tiers": [{"name": 3, "path": "/a"}]}, "tiers[0].name: 3 is not a string"),
    ({"promote_on_hit": "yes"}, "promote_on_hit: 'yes' is not a boolean"),
    ({"recency_flush_seconds": -1}, "recency_flush_seconds: -1 is not a non-negative number"),
    ({"recency_flush_seconds": float("nan")}, "recency_flush_seconds: nan is not a non-negative number"),
    ({"promote_on_hits": True}, "promote_on_hits: unknown setting; did you mean 'promote_on_hit'?"),
    ({"calibrate": "yes"}, "calibrate: 'yes' is not one of off, auto"),
    ({"calibrate": "auto", "predictor": "/c.safetensors"}, "predictor: '/c.safetensors' with calibrate = 'auto'"),
    ({"calibrate": "auto", "calibrate_sample_tokens": 4}, "calibrate_sample_tokens: 4 is too few"),
    ({"calibrate_sample_tokens": -1}, "calibrate_sample_tokens: -1 is not a non-negative integer"),
    ({"tiers": [{"name": "a", "path": "/a"}, {"name": "b", "path": "/b", "predictor": "live"}]},
     "tiers[1].predictor: 'live' re-codes with the live calibration; set calibrate = 'auto'"),
    ({"calibrate": "auto", "tiers": [{"name": "c", "kind": "mooncake"}]},
     "calibrate: 'auto' saves its calibration beside the first tier"),
])
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert message in str(info.value)


def test_live_calibration_settings():
    config = load_config(overrides={"calibrate": "auto", "calibrate_sample_tokens": 1024, "tiers": [
        {"name": "ram", "path": "/dev/shm/x"}, {"name": "ssd", "path": "/var/x", "predictor": "live"}]})
    assert (config.calibrate, config.calibrate_sample_tokens, config.tiers[1].predictor) == ("auto", 1024, "live")
    assert (load_config().calibrate, load_config().calibrate_sample_tokens) == ("off", 4096)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="No such file"):
        load_config(tmp_path / "absent.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("tiers = [\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(broken)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('[[tiers]]\nname = "ram"\npath = "/x"\ncapacity = "lots"\n')
    with pytest.raises(ConfigError, match=r"tiers\[0\].capacity: 'lots'"):
        load_config(wrong)


@pytest.mark.parametrize("text, size", [
    ("16GiB", 16 << 30), ("16 gib", 16 << 30), ("512GiB", 512 << 30), ("1.5GiB", 3 << 29),
    ("100MB", 10**8), ("4096", 4096), ("4096 B", 4096), ("2TiB", 2 << 40), ("1kB", 1000),
    (0, 0), (12345, 12345), ("0.1KiB", 102),
])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GiB", "1.GiB", "-1GiB", "1 GiB 2", "1e9", "16 GB/s", None, True, 1.5])
def test_not_sizes(text):
    with pytest.raises(ConfigError, match="is not a size"):
        parse_size(text, "x")


def test_every_field_is_documented():
    table = fields_markdown()
    for field in FIELDS:
        assert f"`{field.name}`" in table and field.description
    for field in TIER_FIELDS:
        assert f"`tiers[].{field.name}`" in table and field.description


def test_config_command(tmp_path, capsys):
    from sglang_speckv.cli import main

    assert main(["config", str(EXAMPLE)]) == 0
    assert json.loads(capsys.readouterr().out)["tiers"][0]["capacity"] == 16 << 30
    assert main(["config", "--fields"]) == 0
    assert "`tiers[].capacity`" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text("promote_on_hit = 1\n")
    assert main(["config", str(bad)]) == 1
    assert "promote_on_hit: 1 is not a boolean" in capsys.readouterr().err


def test_hostile_files_and_paths(tmp_path, capsys):
    """A file that is not UTF-8, a NUL byte in a path, two tier paths that resolve to one
    directory through a symlink: each a ConfigError naming the field, and no traceback
    from `speckv config`."""
    from sglang_speckv.cli import main

    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('[[tiers]]\nname = "caf\u00e9"\npath = "/x"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(latin1)
    assert main(["config", str(latin1)]) == 1
    assert "not UTF-8 text" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"tiers\[0\].path: .* contains a NUL byte"):
        load_config(overrides={"tiers": [{"name": "a", "path": "/tmp/a\0b"}]})
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ConfigError, match=r"tiers\[1\].path: .* is already tiers\[0\]'s path "
                                          r"\(.* resolves to .*real"):
        load_config(overrides={"tiers": [{"name": "a", "path": str(tmp_path / "real")},
                                          {"name": "b", "path": str(tmp_path / "link")}]})
    nul = tmp_path / "nul.toml"
    nul.write_text('[[tiers]]\nname = "a"\npath = "/tmp/a\\u0000b"\n')
    assert main(["config", str(nul)]) == 1
    assert "tiers[0].path" in capsys.readouterr().err
