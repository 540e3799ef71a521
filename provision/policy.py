"""The policy file (policy.yaml) from which rules.js is rendered: what the device may sign.

A v1 file (``recipients``, ``max_value_eth``, ``origins``, ...) is a valid v2 file: the v2 keys
it lacks take safe defaults (fee caps, no calls, no typed data, no contract creation, no
spending windows). v2 adds, globally and per qube (a ``qubes:`` section only narrows)::

    max_fee_per_gas_gwei: "200"     # maxFeePerGas or legacy gasPrice cap
    max_gas: 300000                 # so value + gas * fee is bounded per transaction
    allow_create: false
    limits: [{window: 24h, max_eth: "0.5"}, {window: 1h, max_tx: 5}]
    calls:
      - erc20: {token: "0x…", decimals: 6, transfer_to: ["0x…"], max_amount: "100",
                approve: [{spender: "0x…", max_amount: "50"}]}
      - contract: "0x…"
        functions: ["deposit()", "withdraw(uint256)"]   # static argument types only
    typed_data:
      - {verifying_contract: "0x…", primary_type: "Order", chain_id: 1}
      - {verifying_contract: "0x…", primary_type: "PermitSingle", spender: "0x…"}
    qubes:
      work: {recipients: ["0x…"], limits: [{window: 24h, max_eth: "0.1"}]}

See docs/policy.md for the meaning of every key.
"""

from __future__ import annotations

import dataclasses
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml

from armory_agent.keccak import selector as _selector
from clef_armory.errors import ConfigError

_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_ORIGIN = re.compile(r"^https?://[A-Za-z0-9.-]+(:\d{1,5})?$")
_QUBE = re.compile(r"^[A-Za-z0-9_.-]{1,31}$")
_TYPE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_SIGNATURE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]{0,63})\(([A-Za-z0-9,]*)\)$")
_DURATION = re.compile(r"^(\d{1,7})(s|m|h|d)$")
_STATIC_TYPE = re.compile(
    r"^(address|bool|bytes([1-9]|[12][0-9]|3[0-2])|uint(8|16|24|32|40|48|56|64|72|80|88|96|"
    r"104|112|120|128|136|144|152|160|168|176|184|192|200|208|216|224|232|240|248|256)|"
    r"int256)$"
)
WEI_PER_ETH = 10**18
WEI_PER_GWEI = 10**9
# Defaults for keys a file does not give (v1 files included): they bound the fee of every transaction.
DEFAULT_MAX_FEE_PER_GAS_GWEI = 200
DEFAULT_MAX_GAS = 300_000  # web3.py adds 100,000 to its gas estimates; contract calls need more
# Primary types that grant an allowance: never signed unless the rule names the spender.
PERMIT_TYPES = (
    "Permit",
    "PermitSingle",
    "PermitBatch",
    "PermitTransferFrom",
    "PermitBatchTransferFrom",
    "PermitWitnessTransferFrom",
    "PermitBatchWitnessTransferFrom",
)
# Allowance-granting functions that `functions:` may not list (erc20.approve names spender and cap).
_ALLOWANCE_FUNCTIONS = ("approve", "increaseAllowance", "increaseApproval", "setApprovalForAll", "permit")

_SCOPE_KEYS = {
    "recipients",
    "max_value_eth",
    "max_value_wei",
    "max_fee_per_gas_gwei",
    "max_gas",
    "allow_create",
    "limits",
    "calls",
    "typed_data",
    "allow_text_signing",
}
_KEYS = _SCOPE_KEYS | {"version", "chain_ids", "origins", "allow_no_origin", "qubes"}
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclasses.dataclass(frozen=True)
class Limit:
    """A rolling window over what was signed (value + worst-case fee), in the device's own clock."""

    window_s: int
    max_wei: int | None = None
    max_tx: int | None = None


@dataclasses.dataclass(frozen=True)
class Approval:
    spender: str
    max_units: int


@dataclasses.dataclass(frozen=True)
class Erc20:
    token: str
    decimals: int
    transfer_to: tuple[str, ...]
    max_units: int  # per transfer, in the token's base units
    approve: tuple[Approval, ...] = ()


@dataclasses.dataclass(frozen=True)
class Function:
    contract: str
    signature: str
    selector: str  # 8 lower-case hex digits
    arg_types: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TypedRule:
    verifying_contract: str
    primary_type: str
    chain_ids: tuple[int, ...]
    spender: str | None = None


@dataclasses.dataclass(frozen=True)
class Scope:
    """The part a qube section may narrow. In a qube's scope, None means "as the global rules"."""

    recipients: tuple[str, ...] | None = None
    max_value_wei: int | None = None
    max_fee_per_gas_wei: int | None = None
    max_gas: int | None = None
    allow_create: bool | None = None
    limits: tuple[Limit, ...] = ()
    erc20: tuple[Erc20, ...] | None = None
    functions: tuple[Function, ...] | None = None
    typed_data: tuple[TypedRule, ...] | None = None
    allow_text_signing: bool | None = None


@dataclasses.dataclass(frozen=True)
class Policy:
    """What the rules auto-approve; everything else is rejected."""

    recipients: tuple[str, ...] = ()
    chain_ids: tuple[int, ...] = (1,)
    max_value_wei: int = 0
    origins: tuple[str, ...] = ()
    allow_no_origin: bool = True
    allow_text_signing: bool = False
    max_fee_per_gas_wei: int = DEFAULT_MAX_FEE_PER_GAS_GWEI * WEI_PER_GWEI
    max_gas: int = DEFAULT_MAX_GAS
    allow_create: bool = False
    limits: tuple[Limit, ...] = ()
    erc20: tuple[Erc20, ...] = ()
    functions: tuple[Function, ...] = ()
    typed_data: tuple[TypedRule, ...] = ()
    qubes: tuple[tuple[str, Scope], ...] = ()
    version: int = 2

    @property
    def scope(self) -> Scope:
        return Scope(
            self.recipients,
            self.max_value_wei,
            self.max_fee_per_gas_wei,
            self.max_gas,
            self.allow_create,
            self.limits,
            self.erc20,
            self.functions,
            self.typed_data,
            self.allow_text_signing,
        )

    @property
    def max_fee_wei(self) -> int:
        """The largest fee one transaction may carry (gas * fee cap)."""
        return self.max_gas * self.max_fee_per_gas_wei


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
    _no_unknown(data, _KEYS, where)
    version = data.get("version", 2 if set(data) - _V1_KEYS else 1)
    if version not in (1, 2) or isinstance(version, bool):
        raise ConfigError(
            f"{where}: version must be 1 or 2 (this is clef-armory's policy format {version!r}?)"
        )
    chain_ids = data.get("chain_ids", [default_chain_id])
    if not isinstance(chain_ids, list) or not chain_ids or not all(_posint(c) for c in chain_ids):
        raise ConfigError(f"{where}: 'chain_ids' must be a list of positive integers")
    origins = _string_list(data, "origins", where)
    for o in origins:
        if not _ORIGIN.match(o):
            raise ConfigError(f"{where}: origin {o!r} must look like https://host[:port] (no path)")
    scope = _scope(data, tuple(chain_ids), where, is_global=True)
    if not (
        scope.recipients
        or scope.erc20
        or scope.functions
        or scope.typed_data
        or scope.allow_text_signing
        or scope.allow_create
    ):
        raise ConfigError(
            f"{where}: the policy allows nothing; list at least one address in 'recipients' "
            "(or give calls, typed_data, allow_text_signing or allow_create)"
        )
    qubes_raw = data.get("qubes", {})
    if not isinstance(qubes_raw, dict):
        raise ConfigError(f"{where}: 'qubes' must map qube names to sections")
    qubes = []
    for name, section in qubes_raw.items():
        if not isinstance(name, str) or not _QUBE.match(name):
            raise ConfigError(f"{where}: qube name {name!r} must be 1-31 of A-Z a-z 0-9 _ . -")
        section = {} if section is None else section
        if not isinstance(section, dict):
            raise ConfigError(f"{where}: qubes.{name} must be a mapping")
        _no_unknown(section, _SCOPE_KEYS, f"{where}: qubes.{name}")
        qubes.append((name, _scope(section, tuple(chain_ids), f"{where}: qubes.{name}", is_global=False)))
    assert scope.recipients is not None and scope.max_value_wei is not None
    assert scope.max_fee_per_gas_wei is not None and scope.max_gas is not None
    return Policy(
        recipients=scope.recipients,
        chain_ids=tuple(chain_ids),
        max_value_wei=scope.max_value_wei,
        origins=tuple(origins),
        allow_no_origin=_flag(data, "allow_no_origin", True, where),
        allow_text_signing=bool(scope.allow_text_signing),
        max_fee_per_gas_wei=scope.max_fee_per_gas_wei,
        max_gas=scope.max_gas,
        allow_create=bool(scope.allow_create),
        limits=scope.limits,
        erc20=scope.erc20 or (),
        functions=scope.functions or (),
        typed_data=scope.typed_data or (),
        qubes=tuple(qubes),
        version=int(version),
    )


_V1_KEYS = {
    "chain_ids",
    "recipients",
    "max_value_eth",
    "max_value_wei",
    "origins",
    "allow_no_origin",
    "allow_text_signing",
}


def _scope(data: dict[str, Any], chain_ids: tuple[int, ...], where: str, is_global: bool) -> Scope:
    """One scope; for a qube (not global) every absent key is None: no narrowing there."""

    def absent(key: str) -> bool:
        return not is_global and key not in data

    recipients = None if absent("recipients") else tuple(_addresses(data, "recipients", where))
    value = None if absent("max_value_eth") and absent("max_value_wei") else _max_value(data, where)
    fee = None if absent("max_fee_per_gas_gwei") else _gwei(data, where)
    gas = None
    if not absent("max_gas"):
        gas = data.get("max_gas", DEFAULT_MAX_GAS)
        if not _posint(gas) or gas < 21000 or gas > 30_000_000:
            raise ConfigError(f"{where}: max_gas must be an integer from 21000 to 30000000")
    calls = None if absent("calls") else data.get("calls", [])
    erc20: tuple[Erc20, ...] | None = None
    functions: tuple[Function, ...] | None = None
    if calls is not None:
        erc20, functions = _calls(calls, where)
    typed = None if absent("typed_data") else _typed_data(data.get("typed_data", []), chain_ids, where)
    create = None if absent("allow_create") else _flag(data, "allow_create", False, where)
    text = None if absent("allow_text_signing") else _flag(data, "allow_text_signing", False, where)
    return Scope(
        recipients,
        value,
        fee,
        gas,
        create,
        _limits(data.get("limits", []), where),
        erc20,
        functions,
        typed,
        text,
    )


def _no_unknown(data: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(str(k) for k in set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")


def _posint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _address(v: Any, what: str, where: str) -> str:
    if not isinstance(v, str) or not _ADDRESS.match(v):
        raise ConfigError(f"{where}: {what} {v!r} is not a 0x-prefixed 40-hex-digit address")
    return v.lower()


def _addresses(data: dict[str, Any], key: str, where: str) -> list[str]:
    return [
        _address(r, key[:-1] if key.endswith("s") else key, where) for r in _string_list(data, key, where)
    ]


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


def _decimal(value: Any, scale: int, what: str, where: str) -> int:
    """A non-negative decimal string/number times 10**scale, exactly."""
    try:
        d = Decimal(str(value))
    except InvalidOperation:
        raise ConfigError(f'{where}: {what} must be a decimal number such as "0.05"') from None
    units = d * (10**scale)
    if not d.is_finite() or d < 0 or units != units.to_integral_value():
        raise ConfigError(f"{where}: {what} must be non-negative with at most {scale} decimals")
    return int(units)


def _max_value(data: dict[str, Any], where: str) -> int:
    if "max_value_wei" in data and "max_value_eth" in data:
        raise ConfigError(f"{where}: give max_value_wei or max_value_eth, not both")
    if "max_value_wei" in data:
        wei = data["max_value_wei"]
        if not isinstance(wei, int) or isinstance(wei, bool) or wei < 0:
            raise ConfigError(f"{where}: max_value_wei must be a non-negative integer")
        return wei
    return _decimal(data.get("max_value_eth", "0"), 18, "max_value_eth", where)


def _gwei(data: dict[str, Any], where: str) -> int:
    wei = _decimal(
        data.get("max_fee_per_gas_gwei", DEFAULT_MAX_FEE_PER_GAS_GWEI), 9, "max_fee_per_gas_gwei", where
    )
    if wei == 0:
        raise ConfigError(f"{where}: max_fee_per_gas_gwei must be above 0")
    return wei


def _limits(raw: Any, where: str) -> tuple[Limit, ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: 'limits' must be a list such as [{{window: 24h, max_eth: \"0.5\"}}]")
    out = []
    for item in raw:
        if not isinstance(item, dict) or "window" not in item or set(item) - {"window", "max_eth", "max_tx"}:
            raise ConfigError(f'{where}: each limit is {{window: 24h, max_eth: "0.5"}} and/or max_tx: N')
        m = _DURATION.match(str(item["window"]))
        if not m or int(m.group(1)) == 0:
            raise ConfigError(f"{where}: limit window {item['window']!r} must look like 30s, 15m, 24h or 7d")
        seconds = int(m.group(1)) * _SECONDS[m.group(2)]
        if seconds > 366 * 86400:
            raise ConfigError(f"{where}: limit window {item['window']!r} is longer than a year")
        max_wei = _decimal(item["max_eth"], 18, "limit max_eth", where) if "max_eth" in item else None
        max_tx = item.get("max_tx")
        if max_tx is not None and (not _posint(max_tx) or max_tx > 100000):
            raise ConfigError(f"{where}: limit max_tx must be an integer from 1 to 100000")
        if max_wei is None and max_tx is None:
            raise ConfigError(f"{where}: a limit needs max_eth or max_tx")
        out.append(Limit(seconds, max_wei, max_tx))
    return tuple(out)


def _calls(raw: Any, where: str) -> tuple[tuple[Erc20, ...], tuple[Function, ...]]:
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: 'calls' must be a list of erc20: {{…}} or contract: … entries")
    erc20: list[Erc20] = []
    functions: list[Function] = []
    for item in raw:
        if isinstance(item, dict) and set(item) == {"erc20"} and isinstance(item["erc20"], dict):
            erc20.append(_erc20(item["erc20"], where))
        elif isinstance(item, dict) and set(item) == {"contract", "functions"}:
            contract = _address(item["contract"], "contract", where)
            sigs = item["functions"]
            if not isinstance(sigs, list) or not sigs or not all(isinstance(s, str) for s in sigs):
                raise ConfigError(f"{where}: contract {contract}: 'functions' must list signatures")
            functions += [_function(contract, s, where) for s in sigs]
        else:
            raise ConfigError(
                f"{where}: each call rule is erc20: {{token, decimals, transfer_to, max_amount}} "
                'or contract: 0x… with functions: ["name(type,…)"]'
            )
    contracts = [e.token for e in erc20] + [f.contract for f in functions]
    for e in erc20:
        if contracts.count(e.token) > 1:
            raise ConfigError(f"{where}: token {e.token} has two call rules; give one")
    return tuple(erc20), tuple(functions)


def _erc20(d: dict[str, Any], where: str) -> Erc20:
    known = {"token", "decimals", "transfer_to", "max_amount", "approve"}
    _no_unknown(d, known, f"{where}: erc20")
    token = _address(d.get("token"), "erc20 token", where)
    decimals = d.get("decimals")
    if not isinstance(decimals, int) or isinstance(decimals, bool) or not 0 <= decimals <= 36:
        raise ConfigError(
            f"{where}: erc20 {token}: decimals (the token's, e.g. 6 for USDC) is required, 0-36"
        )
    transfer_to = tuple(_addresses(d, "transfer_to", where))
    max_units = _decimal(d.get("max_amount", "0"), decimals, f"erc20 {token} max_amount", where)
    approvals = []
    raw = d.get("approve", [])
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: erc20 {token}: approve must be a list of {{spender, max_amount}}")
    for a in raw:
        if not isinstance(a, dict) or set(a) != {"spender", "max_amount"}:
            raise ConfigError(
                f"{where}: erc20 {token}: each approve entry needs exactly spender and max_amount"
            )
        approvals.append(
            Approval(
                _address(a["spender"], "approve spender", where),
                _decimal(a["max_amount"], decimals, "approve max_amount", where),
            )
        )
    return Erc20(token, decimals, transfer_to, max_units, tuple(approvals))


def _function(contract: str, signature: str, where: str) -> Function:
    m = _SIGNATURE.match(signature)
    if not m:
        raise ConfigError(
            f"{where}: contract {contract}: {signature!r} must look like name(type,type) without spaces"
        )
    name, args = m.group(1), m.group(2)
    types = tuple(args.split(",")) if args else ()
    for t in types:
        if not _STATIC_TYPE.match(t):
            raise ConfigError(
                f"{where}: {signature}: argument type {t!r} cannot be checked strictly "
                "(address, bool, uintN, int256, bytes1-32 only)"
            )
    if name in _ALLOWANCE_FUNCTIONS:
        raise ConfigError(
            f"{where}: {signature} grants an allowance; list it as erc20 approve with "
            "spender and max_amount instead"
        )
    return Function(contract, signature, _selector(signature).hex(), types)


def _typed_data(raw: Any, chain_ids: tuple[int, ...], where: str) -> tuple[TypedRule, ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: 'typed_data' must be a list of {{verifying_contract, primary_type}}")
    out = []
    for item in raw:
        if not isinstance(item, dict) or not {"verifying_contract", "primary_type"} <= set(item):
            raise ConfigError(f"{where}: each typed_data rule needs verifying_contract and primary_type")
        _no_unknown(
            item, {"verifying_contract", "primary_type", "chain_id", "spender"}, f"{where}: typed_data"
        )
        contract = _address(item["verifying_contract"], "verifying_contract", where)
        ptype = item["primary_type"]
        if not isinstance(ptype, str) or not _TYPE_NAME.match(ptype):
            raise ConfigError(f"{where}: primary_type {ptype!r} must be a type name such as Order")
        chain = item.get("chain_id")
        if chain is not None and not _posint(chain):
            raise ConfigError(f"{where}: typed_data chain_id must be a positive integer")
        spender = item.get("spender")
        if spender is not None:
            spender = _address(spender, "typed_data spender", where)
        if is_permit(ptype) and spender is None:
            raise ConfigError(f"{where}: typed_data {ptype} grants an allowance; give its spender")
        out.append(TypedRule(contract, ptype, (chain,) if chain is not None else chain_ids, spender))
    return tuple(out)


def is_permit(primary_type: str) -> bool:
    return primary_type in PERMIT_TYPES or "permit" in primary_type.lower()


def duration(seconds: int) -> str:
    units = (("h", 3600), ("m", 60)) if seconds <= 2 * 86400 else (("d", 86400), ("h", 3600), ("m", 60))
    for unit, size in units:
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def eth(wei: int) -> str:
    text = f"{Decimal(wei) / WEI_PER_ETH:f}"
    return (text.rstrip("0").rstrip(".") if "." in text else text) + " ETH"


def units(amount: int, decimals: int) -> str:
    text = f"{Decimal(amount) / (Decimal(10) ** decimals):f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def describe(p: Policy) -> list[str]:
    """The policy in words, one line each (the rules' header and `policy check`)."""
    lines = [f"chains: {', '.join(map(str, p.chain_ids))}"]
    lines += _describe_scope(p.scope, is_global=True)
    who = ", ".join(p.origins) or "none"
    lines.append(f"browser origins: {who}; requests without Origin: {'yes' if p.allow_no_origin else 'no'}")
    for name, scope in p.qubes:
        lines.append(f"qube {name} (only narrows the above):")
        lines += ["  " + x for x in _describe_scope(scope, is_global=False)] or ["  as above"]
    if p.qubes:
        lines.append("requests from a qube not named here: refused")
    return lines


def _describe_scope(s: Scope, is_global: bool) -> list[str]:
    out = []
    if s.recipients is not None:
        out.append(f"plain transfers to: {', '.join(s.recipients) or 'nobody'}")
    if s.max_value_wei is not None:
        out.append(f"value per transaction: at most {eth(s.max_value_wei)}")
    if s.max_fee_per_gas_wei is not None or s.max_gas is not None:
        fee = f"{units(s.max_fee_per_gas_wei, 9)} gwei" if s.max_fee_per_gas_wei is not None else "as above"
        gas = str(s.max_gas) if s.max_gas is not None else "as above"
        out.append(f"fees: gas at most {gas}, maxFeePerGas/gasPrice at most {fee}")
    if s.allow_create is not None:
        out.append(f"contract creation: {'allowed' if s.allow_create else 'refused'}")
    for e in s.erc20 or ():
        to = ", ".join(e.transfer_to) or "nobody"
        out.append(
            f"token {e.token}: transfer to {to}, at most {units(e.max_units, e.decimals)} per transfer"
        )
        for a in e.approve:
            out.append(f"token {e.token}: approve {a.spender} up to {units(a.max_units, e.decimals)}")
    for f in s.functions or ():
        out.append(f"contract {f.contract}: {f.signature} (0x{f.selector})")
    if s.erc20 is not None or s.functions is not None or is_global:
        out.append("any other calldata: refused")
    for t in s.typed_data or ():
        extra = f", spender {t.spender}" if t.spender else ""
        out.append(
            f"typed data: {t.primary_type} of {t.verifying_contract} on chain "
            f"{', '.join(map(str, t.chain_ids))}{extra}"
        )
    if s.typed_data is not None or is_global:
        out.append("any other typed data (Permit included): refused")
    if s.allow_text_signing is not None:
        out.append(f"text signing: {'allowed' if s.allow_text_signing else 'refused'}")
    for lim in s.limits:
        what = " and ".join(
            x
            for x in (
                eth(lim.max_wei) if lim.max_wei is not None else "",
                f"{lim.max_tx} transactions" if lim.max_tx else "",
            )
            if x
        )
        out.append(f"limit: {what} per {duration(lim.window_s)} of the device being on")
    return out


def rules_data(p: Policy) -> dict[str, Any]:
    """The JSON the rules template embeds (numbers that may exceed 2**53 as decimal strings)."""
    return {
        "chain_ids": list(p.chain_ids),
        "origins": list(p.origins),
        "allow_no_origin": p.allow_no_origin,
        "global": _scope_data(p.scope),
        "qubes": {name: _scope_data(s) for name, s in p.qubes},
        "permit_types": list(PERMIT_TYPES),
    }


def _opt(v: int | None) -> str | None:
    return None if v is None else str(v)


def _scope_data(s: Scope) -> dict[str, Any]:
    calls: dict[str, Any] | None = None
    if s.erc20 is not None or s.functions is not None:
        calls = {}
        for e in s.erc20 or ():
            rule = calls.setdefault(e.token, {"functions": {}})
            rule["erc20"] = {
                "transfer_to": list(e.transfer_to),
                "max_units": str(e.max_units),
                "approve": {a.spender: str(a.max_units) for a in e.approve},
            }
        for f in s.functions or ():
            rule = calls.setdefault(f.contract, {"functions": {}})
            rule["functions"][f.selector] = {"signature": f.signature, "types": list(f.arg_types)}
    typed = None
    if s.typed_data is not None:
        typed = [
            {
                "verifying_contract": t.verifying_contract,
                "primary_type": t.primary_type,
                "chain_ids": [str(c) for c in t.chain_ids],
                "spender": t.spender,
            }
            for t in s.typed_data
        ]
    return {
        "recipients": None if s.recipients is None else list(s.recipients),
        "max_value_wei": _opt(s.max_value_wei),
        "max_fee_per_gas_wei": _opt(s.max_fee_per_gas_wei),
        "max_gas": _opt(s.max_gas),
        "allow_create": s.allow_create,
        "limits": [
            {"window_ms": lim.window_s * 1000, "max_wei": _opt(lim.max_wei), "max_tx": lim.max_tx}
            for lim in s.limits
        ],
        "calls": calls,
        "typed_data": typed,
        "allow_text_signing": s.allow_text_signing,
    }
