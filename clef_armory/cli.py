"""The one error path to the user: ArmoryError -> one line on stderr, exit 1."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from clef_armory import config
from clef_armory.errors import ArmoryError

F = TypeVar("F", bound=Callable[..., Any])


def debug_enabled() -> bool:
    """Tracebacks are shown only with --debug (invoke's own flag) or CLEF_ARMORY_DEBUG=1."""
    return "--debug" in sys.argv or "-d" in sys.argv or os.environ.get("CLEF_ARMORY_DEBUG") == "1"


def user_errors(func: F) -> F:
    """Turn ArmoryError (and Ctrl-C) into one line and a non-zero exit."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ArmoryError as e:
            if debug_enabled():
                raise
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        except KeyboardInterrupt:
            if debug_enabled():
                raise
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper  # type: ignore[return-value]


def settings_from(ctx: Any, **overrides: Any) -> config.Settings:
    """Settings from invoke's merged config (invoke.yaml's `armory:` section) plus task flags."""
    section = ctx.config.get("armory", {})
    values = dict(section) if section else {}
    return config.from_mapping({**values, **{k: v for k, v in overrides.items() if v is not None}})
