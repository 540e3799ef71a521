"""The agent's config as provisioning writes it: the image's own template, re-rendered.

``overlay/etc/clef-armory/agent.toml.j2`` is rendered by the image build with a
``cfg`` object (image.overlay.DeviceConfig). Provisioning renders the same template
with a ``cfg`` holding the fields it controls (chain id, ports, link address) plus
``provision`` (the policy's Origins), so a changed chain id or Origin list reaches
the agent without rebuilding the image.
"""

from __future__ import annotations

from typing import Any

import jinja2

from armory_agent import config as agent_config
from armory_agent import usblink
from clef_armory.config import REPO_ROOT
from clef_armory.errors import ConfigError
from provision.layout import DeviceLayout
from provision.policy import Policy

TEMPLATE_DIR = REPO_ROOT / "overlay"
TEMPLATE = "etc/clef-armory/agent.toml.j2"


def method_signatures(policy: Policy | None) -> list[str]:
    """The policy's call signatures, for the agent's eth.method_signatures: Clef refuses calldata
    whose selector it cannot decode before the rules run, so the agent must name them."""
    return sorted({f.signature for f in policy.functions}) if policy else []


def render(layout: DeviceLayout, chain_id: int, policy: Policy | None) -> str:
    agent_host, _, agent_port = layout.agent_listen.rpartition(":")
    _, _, clef_port = layout.clef_listen.rpartition(":")
    cfg: dict[str, Any] = {
        "chain_id": chain_id,
        "agent_port": int(agent_port),
        "clef_http_port": int(clef_port),
        "service_user": layout.clef_user,
        "network": {"interface": usblink.INTERFACE, "device_address": agent_host},
    }
    signatures = method_signatures(policy)
    extra = {"origins": list(policy.origins) if policy else [], "state_dir": layout.state_dir,
             "clef": layout.clef, "rules": layout.rules, "method_signatures": signatures}
    env = jinja2.Environment(  # noqa: S701 - a TOML file, not HTML
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["agent_defaults"] = agent_config.defaults()
    try:
        return env.get_template(TEMPLATE).render(cfg=cfg, provision=extra)
    except jinja2.TemplateError as e:
        raise ConfigError(f"overlay/{TEMPLATE}: {e}") from None
