"""Render the files that land in the armory qube and in each dapp qube from qubes/templates/.

Overlay-style: a template sits at its path inside the qube (``armory-qube/usr/local/etc/...``),
``.j2`` is rendered with one frozen ``QubesConfig`` as ``cfg``; templates whose name starts
with ``_`` are shared pieces included by others. The qube-side programs use only Python's
standard library, so they run on the stock Debian and Fedora templates.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import jinja2

from image.overlay import Network
from qubes import QubesError

_LINK = Network()  # the USB link's fixed addresses, one source for the image and the qubes

TEMPLATES = Path(__file__).resolve().parent / "templates"
QUBES = ("armory-qube", "dapp-qube")
SERVICE = "clefarmory.Sign"
POLICY_FILE = "30-clef-armory.policy"
EXECUTABLE = (
    "armory-qube/usr/local/etc/qubes-rpc/clefarmory.Sign",
    "dapp-qube/usr/local/bin/clef-armory-proxy",
)


@dataclasses.dataclass(frozen=True)
class QubesConfig:
    """Everything the qube-side templates see. Defaults follow docs/design.md and the agent's limits."""

    armory_host: str = _LINK.device_address  # the agent on the USB link, reached from the armory qube
    armory_port: int = 8550
    link_address: str = _LINK.host_address  # the armory qube's end of the USB link (docs/network.md)
    link_mac: str = _LINK.host_mac  # the host side's fixed MAC
    listen_port: int = 8550  # the proxy in each dapp qube, on 127.0.0.1 only
    service: str = SERVICE
    target: str = "@default"  # dom0 policy picks the armory qube
    dapp_user: str = "user"
    policy_file: str = POLICY_FILE
    max_head: int = 16 * 1024
    max_body: int = 256 * 1024  # the agent's policy.max_body
    max_response: int = 8 * 1024 * 1024
    read_timeout: float = 10.0  # to receive a request (slow clients)
    armory_timeout: float = 40.0  # the service waits for the agent (its clef_timeout is 35 s)
    call_timeout: float = 45.0  # the proxy's own clock on the whole qrexec call
    max_clients: int = 16

    @property
    def allowed_hosts(self) -> tuple[str, ...]:
        return (f"127.0.0.1:{self.listen_port}", f"localhost:{self.listen_port}")

    def __post_init__(self) -> None:
        if not (0 < self.read_timeout and 0 < self.armory_timeout < self.call_timeout):
            raise QubesError("timeouts must be positive and armory_timeout below call_timeout")


def _environment() -> jinja2.Environment:
    return jinja2.Environment(  # noqa: S701 - programs and unit files, not HTML
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render_all(cfg: QubesConfig) -> dict[str, bytes]:
    """'<qube>/<path in the qube>' -> content, for every template (pure)."""
    env = _environment()
    out: dict[str, bytes] = {}
    for src in sorted(p for p in TEMPLATES.rglob("*.j2") if p.is_file()):
        rel = src.relative_to(TEMPLATES).as_posix()
        if src.name.startswith("_"):
            continue
        try:
            text = env.get_template(rel).render(cfg=cfg)
        except jinja2.TemplateError as e:
            raise QubesError(f"qubes/templates/{rel}: {e}") from None
        out[rel.removesuffix(".j2")] = text.encode()
    return out


def write_all(cfg: QubesConfig, output: Path) -> list[Path]:
    """Write every qube's files under output/<qube>/ (replaced whole, or left untouched on error)."""
    rendered = render_all(cfg)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".qubes-", dir=output.parent))
    try:
        for rel, content in rendered.items():
            dest = staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(content)
            os.chmod(dest, 0o755 if rel in EXECUTABLE else 0o644)
        for qube in QUBES:
            old = output / qube
            if old.exists():
                shutil.rmtree(old)
        output.mkdir(exist_ok=True)
        for qube in QUBES:
            os.replace(staging / qube, output / qube)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [output / rel for rel in rendered]
