"""Settings: one source of defaults, clear one-line errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from clef_armory import config
from clef_armory.errors import ConfigError, PrerequisiteError
from clef_armory.prereqs import require


def test_defaults_come_from_invoke_yaml() -> None:
    s = config.load()
    assert (s.board, s.suite, s.clef_version, s.chain_id) == ("mk2", "trixie", "1.17.3", 1)
    assert s.output_dir == Path("build")
    assert s.cache_path == Path("~/.cache/clef-armory").expanduser()
    assert s.image_size_bytes == 3500 * 1024 * 1024


def test_overrides_and_replace() -> None:
    s = config.load(overrides={"board": "qemu", "chain_id": "0x5", "suite": None})
    assert (s.board, s.chain_id, s.suite) == ("qemu", 5, "trixie")
    assert s.replace(board="mk1", suite=None).board == "mk1"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("board", "mk3", "unknown board 'mk3'"),
        ("chain_id", "abc", "chain_id must be an integer"),
        ("chain_id", "0", "chain_id must be a positive integer"),
        ("image_size", "lots", "is not a number"),
        ("clef_version", "latest", "not of the form X.Y.Z"),
        ("mirror", "deb.debian.org", "must be an http"),
        ("colour", "blue", "unknown setting"),
    ],
)
def test_bad_values_are_one_line_errors(field: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        config.load(overrides={field: value})
    assert "\n" not in str(e.value)


def test_parse_size_units() -> None:
    assert config.parse_size("4K") == 4096
    assert config.parse_size("2G") == 2 << 30
    assert config.parse_size("3500MiB") == 3500 << 20
    assert config.parse_size("512") == 512


def test_bad_yaml_file(tmp_path: Path) -> None:
    bad = tmp_path / "invoke.yaml"
    bad.write_text("armory: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "missing.yaml")


def test_missing_prerequisite_names_the_apt_command() -> None:
    with pytest.raises(PrerequisiteError, match="apt-get install -y no-such-tool-xyz"):
        require(["no-such-tool-xyz"])
