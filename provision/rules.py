"""rules.js: from a file (--rules) or rendered from a policy (--policy) through the overlay template."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import jinja2

from clef_armory.config import REPO_ROOT
from clef_armory.errors import ConfigError
from provision.policy import Policy, describe, rules_data

TEMPLATE = REPO_ROOT / "overlay" / "var" / "lib" / "clef-armory" / "agent" / "rules.js.j2"


def render(policy: Policy, policy_name: str = "policy.yaml") -> str:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE.parent)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # noqa: S701 - JavaScript, values go through |tojson
    )
    return env.get_template(TEMPLATE.name).render(
        policy_name=re.sub(r"[^\x20-\x7e]", "?", Path(policy_name).name),  # it lands in a JS comment
        version=policy.version,
        summary=describe(policy),
        policy_json=json.dumps(rules_data(policy), indent=1, sort_keys=True),
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
