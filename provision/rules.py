"""rules.js: from a file (--rules) or rendered from a policy (--policy) through the overlay template."""

from __future__ import annotations

import hashlib
from pathlib import Path

import jinja2

from clef_armory.config import REPO_ROOT
from clef_armory.errors import ConfigError
from provision.policy import Policy

TEMPLATE = REPO_ROOT / "overlay" / "var" / "lib" / "clef-armory" / "agent" / "rules.js.j2"


def render(policy: Policy, policy_name: str = "policy.yaml") -> str:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE.parent)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # noqa: S701 - JavaScript, values go through |tojson
    )
    return env.get_template(TEMPLATE.name).render(
        policy_name=Path(policy_name).name,
        chain_ids=list(policy.chain_ids),
        recipients=list(policy.recipients),
        max_value_wei=str(policy.max_value_wei),
        origins=list(policy.origins),
        allow_no_origin=policy.allow_no_origin,
        allow_text_signing=policy.allow_text_signing,
    )


def read_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read rules file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"rules file {path} is not UTF-8 text") from None
    if "function" not in text:
        raise ConfigError(f"rules file {path} defines no function; is it a Clef rules.js?")
    return text


def sha256(text: str) -> str:
    """The hash Clef compares: lower-case hex sha256 of the exact bytes."""
    return hashlib.sha256(text.encode()).hexdigest()
