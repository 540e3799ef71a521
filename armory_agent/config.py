"""The agent's configuration: one TOML (or JSON) file, validated at start into frozen dataclasses.

Every key is optional. The dataclasses below hold the defaults (the device's values, docs/design.md;
the link's address and ports come from ``armory_agent.usblink``); the schema with its defaults at the
end of this docstring and the file the image installs (``overlay/etc/clef-armory/agent.toml.j2``)
are rendered from them (``defaults()``). What the keys mean::

    [clef]
    binary, state_dir                    # configdir = <state_dir>/clef, keystore = <state_dir>/keystore
    chain_id
    http_port                            # Clef's own HTTP, always on 127.0.0.1; never listen.port
    rules                                # passed as --rules when the file exists
    lightkdf                             # only for tests: weak scrypt for NEW keys
    restart_backoff_max                  # seconds; Clef restarts back off 1, 2, 4 ... up to this
    startup_timeout                      # seconds Clef may take to ask for the master password / start

    [listen]
    interface                            # kernel-enforced with SO_BINDTODEVICE
    address, port, bind_to_device

    [policy]
    methods                              # allowlist; eth_* are translated (see [eth])
    hosts                                # Host allowlist (DNS rebinding); default: listen address[:port]
    origins                              # Origin allowlist; a request carrying another Origin gets 403
    cors                                 # send CORS headers to allowed origins (needs origins)
    approve_listing                      # answer listings the rules leave undecided with all accounts
    max_body                             # bytes; larger bodies get 413
    header_timeout, body_timeout         # seconds to receive the request head (slowloris) / the body
    max_connections
    rate, burst                          # requests per second per peer address (token bucket) and
                                         # its bucket size; over it: 429
    max_batch
    sign_queue                           # signing requests allowed to wait behind the one inside Clef
    sign_wait                            # seconds a signing request may wait for its turn
    clef_timeout                         # seconds to wait for Clef's answer (Clef itself gives up at ~30)

    [audit]
    path, max_bytes                      # rotate when the file reaches max_bytes ...
    keep                                 # ... keeping audit.jsonl.1 ... .N

    [control]
    socket

    [leds]
    path                                 # missing directory or LEDs: no-op

    [eth]                                # wallet methods translated to account_* (armory_agent/ethapi.py)
    enabled
    sign_transaction_result              # "raw": eth_signTransaction answers the signed tx hex (ethers,
                                         # viem); "object": {raw, tx} like geth (web3.py, web3.js)
    method_signatures                    # e.g. ["mint(address,uint256)"]: sent to Clef as methodSelector
"""

from __future__ import annotations

import ipaddress
import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from armory_agent import usblink
from armory_agent.errors import ConfigError

DEFAULT_PATH = Path("/etc/clef-armory/agent.toml")

DEFAULT_METHODS = (
    "account_list",
    "account_signTransaction",
    "account_signData",
    "account_signTypedData",
    "account_ecRecover",
    "account_version",
    # eth_* wallet methods (armory_agent/ethapi.py); inert when [eth] enabled = false
    "eth_accounts",
    "eth_requestAccounts",
    "eth_chainId",
    "eth_signTransaction",
    "eth_sign",
    "personal_sign",
    "eth_signTypedData",
    "eth_signTypedData_v3",
    "eth_signTypedData_v4",
    "eth_sendTransaction",
)

_IFNAME = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")


@dataclass(frozen=True)
class ClefConfig:
    binary: Path = Path("/usr/local/bin/clef")
    state_dir: Path = Path("/var/lib/clef-armory/agent")
    chain_id: int = 1
    http_port: int = usblink.CLEF_HTTP_PORT
    rules: Path = Path("/var/lib/clef-armory/agent/rules.js")
    lightkdf: bool = False
    restart_backoff_max: float = 30.0
    startup_timeout: float = 60.0

    @property
    def configdir(self) -> Path:
        return self.state_dir / "clef"

    @property
    def keystore(self) -> Path:
        return self.state_dir / "keystore"

    @property
    def auditlog(self) -> Path:
        return self.state_dir / "clef-audit.log"

    @property
    def fourbyte_custom(self) -> Path:
        return self.state_dir / "4byte-custom.json"


@dataclass(frozen=True)
class ListenConfig:
    interface: str = usblink.INTERFACE
    address: str = usblink.DEVICE_ADDRESS
    port: int = usblink.AGENT_PORT
    bind_to_device: bool = True


@dataclass(frozen=True)
class PolicyConfig:
    methods: tuple[str, ...] = DEFAULT_METHODS
    hosts: tuple[str, ...] = (usblink.DEVICE_ADDRESS, f"{usblink.DEVICE_ADDRESS}:{usblink.AGENT_PORT}")
    origins: tuple[str, ...] = ()
    cors: bool = False
    approve_listing: bool = False
    max_body: int = 256 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 10.0
    max_connections: int = 64
    rate: float = 20.0
    burst: int = 40
    max_batch: int = 16
    sign_queue: int = 4
    sign_wait: float = 120.0
    clef_timeout: float = 35.0


@dataclass(frozen=True)
class AuditConfig:
    path: Path = Path("/var/lib/clef-armory/agent/audit.jsonl")
    max_bytes: int = 4 * 1024 * 1024
    keep: int = 4


@dataclass(frozen=True)
class ControlConfig:
    socket: Path = Path("/run/clef-armory/control.sock")


@dataclass(frozen=True)
class LedConfig:
    path: Path = Path("/sys/class/leds")


@dataclass(frozen=True)
class EthConfig:
    enabled: bool = True
    sign_transaction_result: str = "raw"
    method_signatures: tuple[str, ...] = ()


@dataclass(frozen=True)
class AgentConfig:
    clef: ClefConfig = field(default_factory=ClefConfig)
    listen: ListenConfig = field(default_factory=ListenConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    leds: LedConfig = field(default_factory=LedConfig)
    eth: EthConfig = field(default_factory=EthConfig)


# --- value readers: each returns the checked value or raises ConfigError naming the key ---


def _get(section: Mapping[str, Any], name: str, key: str, kind: type, default: Any) -> Any:
    if key not in section:
        return default
    value = section[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, bool):
        raise ConfigError(f"{name}.{key} must be an integer, not {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"{name}.{key} must be {kind.__name__}, not {type(value).__name__}")
    return value


def _positive(name: str, value: float) -> float:
    if value <= 0:
        raise ConfigError(f"{name} must be positive, not {value}")
    return value


def _abs_path(section: Mapping[str, Any], name: str, key: str, default: Path) -> Path:
    raw = _get(section, name, key, str, str(default))
    path = Path(raw)
    if not path.is_absolute():
        raise ConfigError(f"{name}.{key} must be an absolute path, not {raw!r}")
    return path


def _strings(section: Mapping[str, Any], name: str, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    if key not in section:
        return default
    value = section[key]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{name}.{key} must be a list of non-empty strings")
    return tuple(value)


def _port(name: str, value: int) -> int:
    if not 1 <= value <= 65535:
        raise ConfigError(f"{name} must be a TCP port (1-65535), not {value}")
    return value


def _section(data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}] must be a table")
    return value


_KNOWN: dict[str, set[str]] = {
    "clef": {f for f in ClefConfig.__dataclass_fields__},
    "listen": {f for f in ListenConfig.__dataclass_fields__},
    "policy": {f for f in PolicyConfig.__dataclass_fields__},
    "audit": {f for f in AuditConfig.__dataclass_fields__},
    "control": {f for f in ControlConfig.__dataclass_fields__},
    "leds": {f for f in LedConfig.__dataclass_fields__},
    "eth": {f for f in EthConfig.__dataclass_fields__},
}


def from_mapping(data: Mapping[str, Any]) -> AgentConfig:
    """Validate a parsed config; unknown keys are errors so typos never silently weaken policy."""
    _check_known(data)
    clef = _clef(_section(data, "clef"))
    listen = _listen(_section(data, "listen"), clef)
    return AgentConfig(
        clef=clef,
        listen=listen,
        policy=_policy(_section(data, "policy"), listen),
        audit=_audit(_section(data, "audit")),
        control=_control(_section(data, "control")),
        leds=LedConfig(path=_abs_path(_section(data, "leds"), "leds", "path", LedConfig().path)),
        eth=_eth(_section(data, "eth")),
    )


def _check_known(data: Mapping[str, Any]) -> None:
    for key, value in data.items():
        if key not in _KNOWN:
            raise ConfigError(f"unknown section [{key}] (known: {', '.join(sorted(_KNOWN))})")
        if not isinstance(value, dict):
            raise ConfigError(f"[{key}] must be a table")
        for sub in value:
            if sub not in _KNOWN[key]:
                raise ConfigError(f"unknown key {key}.{sub}")


def _clef(c: Mapping[str, Any]) -> ClefConfig:
    d = ClefConfig()
    clef = ClefConfig(
        binary=_abs_path(c, "clef", "binary", d.binary),
        state_dir=_abs_path(c, "clef", "state_dir", d.state_dir),
        chain_id=_get(c, "clef", "chain_id", int, d.chain_id),
        http_port=_port("clef.http_port", _get(c, "clef", "http_port", int, d.http_port)),
        rules=_abs_path(c, "clef", "rules", d.rules),
        lightkdf=_get(c, "clef", "lightkdf", bool, d.lightkdf),
        restart_backoff_max=_positive(
            "clef.restart_backoff_max",
            _get(c, "clef", "restart_backoff_max", float, d.restart_backoff_max),
        ),
        startup_timeout=_positive(
            "clef.startup_timeout", _get(c, "clef", "startup_timeout", float, d.startup_timeout)
        ),
    )
    if clef.chain_id <= 0:
        raise ConfigError(f"clef.chain_id must be a positive integer, not {clef.chain_id}")
    return clef


def _listen(sec: Mapping[str, Any], clef: ClefConfig) -> ListenConfig:
    """The listen address and port, and that Clef's own loopback port cannot collide with them."""
    dl = ListenConfig()
    listen = ListenConfig(
        interface=_get(sec, "listen", "interface", str, dl.interface),
        address=_get(sec, "listen", "address", str, dl.address),
        port=_port("listen.port", _get(sec, "listen", "port", int, dl.port)),
        bind_to_device=_get(sec, "listen", "bind_to_device", bool, dl.bind_to_device),
    )
    if not _IFNAME.match(listen.interface):
        raise ConfigError(f"listen.interface is not an interface name: {listen.interface!r}")
    try:
        addr = ipaddress.IPv4Address(listen.address)
    except ValueError:
        raise ConfigError(f"listen.address must be an IPv4 address, not {listen.address!r}") from None
    if addr.is_unspecified or addr.is_multicast:
        raise ConfigError(f"listen.address must be one host address, not {listen.address}")
    if clef.http_port == listen.port and addr.is_loopback:
        raise ConfigError("clef.http_port must differ from listen.port")
    if clef.http_port == usblink.AGENT_PORT:
        raise ConfigError(f"clef.http_port must not be {usblink.AGENT_PORT} (the agent's public port)")
    return listen


def _policy(p: Mapping[str, Any], listen: ListenConfig) -> PolicyConfig:
    dp = PolicyConfig()

    def positive(key: str, kind: type) -> Any:
        return _positive(f"policy.{key}", _get(p, "policy", key, kind, getattr(dp, key)))

    policy = PolicyConfig(
        methods=_strings(p, "policy", "methods", dp.methods),
        # Default: the listen address as an IP literal, with or without the port.
        hosts=tuple(
            h.lower()
            for h in _strings(p, "policy", "hosts", (listen.address, f"{listen.address}:{listen.port}"))
        ),
        origins=_strings(p, "policy", "origins", dp.origins),
        cors=_get(p, "policy", "cors", bool, dp.cors),
        approve_listing=_get(p, "policy", "approve_listing", bool, dp.approve_listing),
        max_body=int(positive("max_body", int)),
        header_timeout=positive("header_timeout", float),
        body_timeout=positive("body_timeout", float),
        max_connections=int(positive("max_connections", int)),
        rate=positive("rate", float),
        burst=int(positive("burst", int)),
        max_batch=int(positive("max_batch", int)),
        sign_queue=_get(p, "policy", "sign_queue", int, dp.sign_queue),
        sign_wait=positive("sign_wait", float),
        clef_timeout=positive("clef_timeout", float),
    )
    if policy.sign_queue < 0:
        raise ConfigError(f"policy.sign_queue must be 0 or more, not {policy.sign_queue}")
    if policy.cors and not policy.origins:
        raise ConfigError("policy.cors needs policy.origins (CORS for no origin makes no sense)")
    for origin in policy.origins:
        if origin == "*" or not re.match(r"^[a-z][a-z0-9+.-]*://[^/\s]+$", origin):
            raise ConfigError(f"policy.origins entry must be scheme://host[:port], not {origin!r}")
    for method in policy.methods:
        if not re.match(r"^[A-Za-z0-9_]+$", method):
            raise ConfigError(f"policy.methods entry is not a method name: {method!r}")
    return policy


def _audit(a: Mapping[str, Any]) -> AuditConfig:
    da = AuditConfig()
    return AuditConfig(
        path=_abs_path(a, "audit", "path", da.path),
        max_bytes=int(_positive("audit.max_bytes", _get(a, "audit", "max_bytes", int, da.max_bytes))),
        keep=int(_positive("audit.keep", _get(a, "audit", "keep", int, da.keep))),
    )


def _control(sec: Mapping[str, Any]) -> ControlConfig:
    control = ControlConfig(socket=_abs_path(sec, "control", "socket", ControlConfig().socket))
    if len(str(control.socket).encode()) > 107:
        raise ConfigError(f"control.socket path is too long for a unix socket: {control.socket}")
    return control


def _eth(e: Mapping[str, Any]) -> EthConfig:
    eth = EthConfig(
        enabled=_get(e, "eth", "enabled", bool, EthConfig.enabled),
        sign_transaction_result=_get(
            e, "eth", "sign_transaction_result", str, EthConfig.sign_transaction_result
        ),
        method_signatures=_strings(e, "eth", "method_signatures", ()),
    )
    for sig in eth.method_signatures:
        if not re.match(r"^[A-Za-z_$][A-Za-z0-9_$]*\([A-Za-z0-9_\[\](),]*\)$", sig):
            raise ConfigError(f"eth.method_signatures entry is not like transfer(address,uint256): {sig!r}")
    if eth.sign_transaction_result not in ("raw", "object"):
        raise ConfigError(
            f"eth.sign_transaction_result must be raw or object, not {eth.sign_transaction_result!r}"
        )
    return eth


def defaults() -> dict[str, dict[str, Any]]:
    """Every section's defaults as plain TOML values (paths as strings, tuples as lists): what the
    image's agent.toml template and this module's docstring are rendered from."""
    def plain(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return str(value) if isinstance(value, Path) else value

    cfg = asdict(AgentConfig())
    return {f.name: {k: plain(v) for k, v in cfg[f.name].items()} for f in fields(AgentConfig)}


def defaults_toml() -> str:
    """The defaults as a complete config file."""
    lines: list[str] = []
    for section, values in defaults().items():
        lines += ["", f"[{section}]", *(f"{key} = {json.dumps(value)}" for key, value in values.items())]
    return "\n".join(lines[1:]) + "\n"


if __doc__ is not None:  # python -OO drops docstrings
    __doc__ += "\nDefaults::\n\n" + "".join(
        f"    {line}\n" if line else "\n" for line in defaults_toml().splitlines()
    )


def load(path: Path) -> AgentConfig:
    """Read and validate PATH (.json is JSON, anything else TOML)."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            data = tomllib.loads(text.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise ConfigError(f"{path}: not valid {kind}: {first}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a table")
    try:
        return from_mapping(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
