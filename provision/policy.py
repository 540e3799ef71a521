"""The small policy file (policy.yaml) from which rules.js is rendered.

Example (every key but ``recipients`` optional)::

    chain_ids: [1]                  # default: the --chain-id / settings chain id
    recipients: ["0xAbC...123"]     # the only `to` addresses that may be signed for
    max_value_eth: "0.05"           # per-transaction cap (or max_value_wei: 50000000000000000)
    origins: ["https://app.example"]  # Origin headers that may ask; others are rejected
    allow_no_origin: true           # requests without an Origin header (CLI tools) may ask
    allow_text_signing: false       # personal_sign / eth_sign (text/plain) allowed
"""

from __future__ import annotations

import dataclasses
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml

from clef_armory.errors import ConfigError

_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_ORIGIN = re.compile(r"^https?://[A-Za-z0-9.-]+(:\d{1,5})?$")
_KEYS = {"chain_ids", "recipients", "max_value_eth", "max_value_wei", "origins", "allow_no_origin",
         "allow_text_signing"}
WEI_PER_ETH = 10**18


@dataclasses.dataclass(frozen=True)
class Policy:
    """What the rules auto-approve; everything else is rejected."""

    recipients: tuple[str, ...]
    chain_ids: tuple[int, ...] = (1,)
    max_value_wei: int = 0
    origins: tuple[str, ...] = ()
    allow_no_origin: bool = True
    allow_text_signing: bool = False


def load(path: Path, default_chain_id: int = 1) -> Policy:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read policy file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"policy file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return parse(data, default_chain_id, str(path))


def parse(data: Any, default_chain_id: int = 1, where: str = "policy") -> Policy:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of settings")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_KEYS))}")
    recipients = _string_list(data, "recipients", where)
    for r in recipients:
        if not _ADDRESS.match(r):
            raise ConfigError(f"{where}: recipient {r!r} is not a 0x-prefixed 40-hex-digit address")
    if not recipients:
        raise ConfigError(f"{where}: 'recipients' must list at least one address")
    chain_ids = data.get("chain_ids", [default_chain_id])
    if not isinstance(chain_ids, list) or not chain_ids or not all(
        isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in chain_ids
    ):
        raise ConfigError(f"{where}: 'chain_ids' must be a list of positive integers")
    origins = _string_list(data, "origins", where)
    for o in origins:
        if not _ORIGIN.match(o):
            raise ConfigError(f"{where}: origin {o!r} must look like https://host[:port] (no path)")
    return Policy(
        recipients=tuple(r.lower() for r in recipients),
        chain_ids=tuple(chain_ids),
        max_value_wei=_max_value(data, where),
        origins=tuple(origins),
        allow_no_origin=_flag(data, "allow_no_origin", True, where),
        allow_text_signing=_flag(data, "allow_text_signing", False, where),
    )


def _string_list(data: dict[str, Any], key: str, where: str) -> list[str]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: {key!r} must be a list of strings")
    return list(value)


def _flag(data: dict[str, Any], key: str, default: bool, where: str) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key!r} must be true or false")
    return value


def _max_value(data: dict[str, Any], where: str) -> int:
    if "max_value_wei" in data and "max_value_eth" in data:
        raise ConfigError(f"{where}: give max_value_wei or max_value_eth, not both")
    if "max_value_wei" in data:
        wei = data["max_value_wei"]
        if not isinstance(wei, int) or isinstance(wei, bool) or wei < 0:
            raise ConfigError(f"{where}: max_value_wei must be a non-negative integer")
        return wei
    try:
        eth = Decimal(str(data.get("max_value_eth", "0")))
    except InvalidOperation:
        raise ConfigError(f"{where}: max_value_eth must be a decimal number such as \"0.05\"") from None
    wei_value = eth * WEI_PER_ETH
    if eth < 0 or wei_value != wei_value.to_integral_value():
        raise ConfigError(f"{where}: max_value_eth must be non-negative with at most 18 decimals")
    return int(wei_value)
