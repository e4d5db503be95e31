"""Reading the node's configuration: one YAML file, every key overridable from the environment.

The YAML file (``config/aiworker.yaml`` holds the embedded defaults) is read, then each
environment variable ``AIWORKER_<SECTION>__<KEY>`` (more ``__`` for deeper keys, e.g.
``AIWORKER_DESTINATIONS__PACS__PORT``) replaces one value; the value is read as YAML, so
``AIWORKER_NODE__ALLOWED_CALLERS='[{ae_title: MODALITY}]'`` works. The result is checked
by the pydantic models of :mod:`aiworker.config`. A bad configuration raises
:class:`ConfigError` whose message has one line per problem: where the value came from,
the key, the bad value and what is allowed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from aiworker.config import Config

DEFAULT_CONFIG = Path("config/aiworker.yaml")
ENV_PREFIX = "AIWORKER_"


class ConfigError(Exception):
    """A configuration that cannot be used; ``str()`` has one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def load_config(path: Path | str = DEFAULT_CONFIG, environ: dict[str, str] | None = None) -> Config:
    """Read the YAML file at ``path``, apply ``AIWORKER_*`` overrides, and validate."""
    path = Path(path)
    environ = dict(os.environ) if environ is None else environ
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the config file: {exc.strerror}"]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"]) from exc
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections"])
    sources = _apply_env_overrides(raw, environ)
    problems = [_line(path, sources, loc, message, value)
                for loc, message, value in _unknown_destinations(raw)]
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path, sources) + problems) from exc
    if problems:
        raise ConfigError(problems)
    return config


def _unknown_destinations(raw: dict[str, Any]) -> list[tuple[tuple, str, Any]]:
    """Pipelines that send to a destination the file does not define (checked on the raw
    mapping, so it is reported together with every other problem)."""
    destinations = raw.get("destinations")
    known = sorted(destinations) if isinstance(destinations, dict) else []
    pipelines = raw.get("pipelines")
    found = []
    for i, pipeline in enumerate(pipelines if isinstance(pipelines, list) else []):
        send_to = pipeline.get("send_to") if isinstance(pipeline, dict) else None
        for j, name in enumerate(send_to if isinstance(send_to, list) else []):
            if name not in known:
                allowed = ", ".join(known) or "none defined"
                found.append((("pipelines", str(i), "send_to", str(j)),
                              f"unknown destination (destinations: {allowed})", name))
    return found


def _apply_env_overrides(raw: dict[str, Any], environ: dict[str, str]) -> dict[tuple, str]:
    """Write each AIWORKER_A__B__C variable into raw[a][b][c]; return key path -> variable."""
    sources: dict[tuple, str] = {}
    for name, text in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        keys = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        target = raw
        for key in keys[:-1]:
            if not isinstance(target.get(key), dict):
                target[key] = {}
            target = target[key]
        try:
            target[keys[-1]] = yaml.safe_load(text)
        except yaml.YAMLError:
            target[keys[-1]] = text
        sources[tuple(keys)] = name
    return sources


def _describe(exc: ValidationError, path: Path, sources: dict[tuple, str]) -> list[str]:
    """One line per pydantic problem."""
    lines = []
    for error in exc.errors():
        loc = tuple(str(part) for part in error["loc"] if not str(part).startswith("function-"))
        loc = tuple(part for part in loc if part not in ("dicom", "hl7", "dicomweb"))
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        value = error.get("input")
        if isinstance(value, dict) or error["type"] == "missing" or _secret(loc):
            value = _NOT_SHOWN
        lines.append(_line(path, sources, loc, message, value))
    return lines


_NOT_SHOWN = object()


def _secret(loc: tuple) -> bool:
    """A key that may hold a secret (a token, a password): its value is never shown."""
    return bool(loc) and any(word in loc[-1] for word in ("token", "password", "secret"))


def _line(path: Path, sources: dict[tuple, str], loc: tuple, message: str, value: Any) -> str:
    """``source: dotted.key: message (got value)``. The source is the environment variable
    that set the key, or one below it, else the file."""
    origin = next(
        (f"{var} (environment)" for keys, var in sources.items()
         if loc[: len(keys)] == keys or (loc and keys[: len(loc)] == loc)),
        str(path),
    )
    shown = "" if value is _NOT_SHOWN else f" (got {value!r})"
    return f"{origin}: {'.'.join(loc) or '(top level)'}: {message}{shown}"
