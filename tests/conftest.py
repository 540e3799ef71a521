"""Shared fixtures: the real Clef binary for the laptop's architecture."""

from __future__ import annotations

from pathlib import Path

import pytest

from clef_armory import clef, config


@pytest.fixture(scope="session")
def settings() -> config.Settings:
    """The project's defaults from invoke.yaml."""
    return config.load()


@pytest.fixture(scope="session")
def clef_binary(settings: config.Settings) -> Path:
    """A real Clef built from source (cached under the cache dir) for this machine."""
    binary = clef.acquire(
        "source", version=settings.clef_version, arch=clef.host_arch(), cache_dir=settings.cache_path
    )
    return binary.path


@pytest.fixture(scope="session")
def clef_binary_armv7(settings: config.Settings) -> clef.ClefBinary:
    """The device's Clef (ARMv7), built from source and cached."""
    return clef.acquire(
        "source", version=settings.clef_version, arch="armv7", cache_dir=settings.cache_path
    )
