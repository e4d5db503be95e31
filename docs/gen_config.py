"""The configuration reference, from the pydantic models of :mod:`aiworker.config` (key,
type, default, meaning), with the shipped file's comment where a field has no description."""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from aiworker.config import Config, DicomDestination, DicomWebDestination, HL7Destination

SHIPPED = Path(__file__).resolve().parents[1] / "config" / "aiworker.yaml"


def config_reference() -> str:
    """One table per section, in the order of :class:`Config`."""
    comments = shipped_comments()
    out = []
    for section, field in Config.model_fields.items():
        out.append(f"### `{section}`\n")
        model = _model_of(field.annotation)
        doc = (model.__doc__ or "").strip().split("\n\n")[0] if model else ""
        if doc:
            out.append(" ".join(doc.split()) + "\n")
        out.append("| key | type | default | meaning |\n| --- | --- | --- | --- |")
        out.extend(_rows(section, field, comments))
        out.append("")
    return "\n".join(out)


def _rows(section: str, field: FieldInfo, comments: dict[str, str]) -> list[str]:
    if section == "destinations":
        kinds = (("dicom", DicomDestination), ("hl7", HL7Destination),
                 ("dicomweb", DicomWebDestination))
        return [row for kind, model in kinds
                for row in _model_rows(f"destinations.NAME ({kind})", model, comments, "")]
    model = _model_of(field.annotation)
    if model is None:
        return [_row(section, field, comments.get(section, ""))]
    prefix = f"{section}[]" if typing.get_origin(field.annotation) is list else section
    return _model_rows(prefix, model, comments, section)


def _model_rows(prefix: str, model: type[BaseModel], comments: dict[str, str],
                comment_prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        nested = _model_of(field.annotation)
        key = f"{prefix}.{name}"
        if nested is not None and typing.get_origin(field.annotation) is not list:
            rows.extend(_model_rows(key, nested, comments, f"{comment_prefix}.{name}"))
            continue
        rows.append(_row(key, field, comments.get(f"{comment_prefix}.{name}", "")))
    return rows


def _row(key: str, field: FieldInfo, comment: str) -> str:
    meaning = " ".join((field.description or comment).split()).replace("|", "\\|")
    return f"| `{key}` | {_type_name(field.annotation)} | {_default(field)} | {meaning} |"


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds (itself, or the items of a list of them)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        return _model_of(item)
    return None


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not typing.get_args(annotation) else None
    if text is None or isinstance(annotation, types.UnionType):
        text = str(annotation).replace("typing.", "").replace("pathlib.", "")
        text = re.sub(r"aiworker\.config\.", "", text)
    text = text.replace("NoneType", "None")
    return f"`{text}`".replace("|", "\\|")


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return ""
    if isinstance(value, Path):
        return f"`{value}`"
    return f"`{value!r}`".replace("|", "\\|") if value not in ("", None) else f"`{value}`"


def shipped_comments() -> dict[str, str]:
    """``section.key`` -> the comment on its line in the shipped config file."""
    comments, section = {}, None
    for line in SHIPPED.read_text(encoding="utf-8").splitlines():
        top = re.match(r"^([a-z_]+):", line)
        if top:
            section = top.group(1)
        keyed = re.match(r"^  ([a-z_]+):.*?#\s*(.+)$", line)
        if keyed and section:
            comments[f"{section}.{keyed.group(1)}"] = keyed.group(2).strip()
    return comments


GENERATED = {"config-reference": config_reference}
