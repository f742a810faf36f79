"""Building the Policy: the contract's defaults, then the TOML file (QP_CONFIG), then QP_*
environment variables, which win. Every value is checked (qp/policy/settings.py); a bad one
is a ConfigError naming where it came from. `policy_as_toml` writes a policy back in the
file's shape.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qp.errors import ConfigError
from qp.policy.policy import AppRules, Policy
from qp.policy.settings import SETTINGS, WHOLE_SECTIONS


def load_policy(environ: Mapping[str, str], config_path: Path | None) -> Policy:
    """Defaults, then the file, then the environment; ConfigError on the first bad value."""
    values: dict[str, Any] = {}
    if config_path is not None:
        values.update(_from_file(config_path))
    for setting in SETTINGS:
        raw = environ.get(setting.env) if setting.env else None
        # An empty QP_TRUSTED_PROXIES means "trust nobody" (QP_APPS: "any app"); other empty
        # variables are unset.
        if raw is None or (not raw.strip() and setting.field not in ("trusted_proxies", "apps")):
            continue
        try:
            values[setting.field] = setting.check(setting.from_env(raw))
        except ValueError as err:
            raise ConfigError(f"{setting.env}: {err}") from None
    return Policy(**values)


def _from_file(path: Path) -> dict[str, Any]:
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"QP_CONFIG {path}: cannot read it: {err.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"QP_CONFIG {path}: not valid TOML: {err}") from None
    known = {(s.section, s.key): s for s in SETTINGS}
    values: dict[str, Any] = {}
    for name, value in document.items():
        entries: list[tuple[str | None, str, Any]]
        if name == "apps" and isinstance(value, dict) and "allowed" in value:
            # The apps list beside the [apps."name"] sections (TOML has one `apps`).
            value = dict(value)
            entries = [(None, "apps", value.pop("allowed")), ("apps", "*", value)]
        elif name in WHOLE_SECTIONS and (name != "apps" or isinstance(value, dict)):
            entries = [(name, "*", value)]
        elif isinstance(value, dict):
            entries = [(name, key, item) for key, item in value.items()]
        else:
            entries = [(None, name, value)]
        for section, key, item in entries:
            setting = known.get((section, key))
            where = (section if key == "*" else f"{section}.{key}") if section else key
            if setting is None:
                raise ConfigError(f"QP_CONFIG {path}: unknown setting {where!r}")
            try:
                values[setting.field] = setting.check(item)
            except ValueError as err:
                raise ConfigError(f"QP_CONFIG {path}: {where} {err}") from None
    return values


def policy_as_toml(policy: Policy) -> str:
    """The policy in the file's own shape: a valid QP_CONFIG file."""
    lines: list[str] = []
    # With [apps."name"] sections the apps list goes in their table, as `allowed`.
    sections = policy.app_rules != AppRules()
    for section in (None, "chats", "completion", "budgets", "cache", "prices", "apps"):
        if section == "apps" and not sections:
            continue
        if section is not None:
            lines += ["", f"[{section}]"]
        if section == "apps":
            lines.append(f"allowed = {_toml_value(policy.apps)}")
        for setting in SETTINGS:
            if setting.section != section or (sections and setting.field == "apps"):
                continue
            value = setting.to_file(getattr(policy, setting.field))
            if setting.key == "*":
                lines += [
                    f"{_toml_value(key)} = {_toml_value(item)}" for key, item in value.items()
                ]
            else:
                lines.append(f"{setting.key} = {_toml_value(value)}")
    return "\n".join(lines).lstrip("\n") + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        items = [f"{_toml_value(str(key))} = {_toml_value(item)}" for key, item in value.items()]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, bool | int | float):
        return json.dumps(value)
    # A JSON string is a TOML basic string.
    return json.dumps(str(value), ensure_ascii=False)
