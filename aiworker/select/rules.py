"""The rule language of series selection, and reading it: one YAML file per pipeline
(``config/rules/``), checked and built into the objects of :mod:`aiworker.select.conditions`,
which do the evaluating.

A pipeline's rule file names the series **roles** its model needs. Each role has a list of
conditions a series must meet (``require``, all of them, checked in order) and
**preferences** that rank several series meeting them (``prefer``, the first preference
that tells two series apart decides). The bundled knee model needs one role::

    description: Sagittal PD fat-suppressed knee MR for the bundled knee-demo model
    roles:
      main:
        description: sagittal proton-density fat-suppressed series, as acquired
        require:
          - {tag: Modality, equals: MR}
          - {feature: localizer, equals: false}
          - {feature: original, equals: true}
          - {feature: plane, equals: sagittal}
          - {feature: weighting, equals: PD}
          - {feature: fat_suppressed, equals: true}
          - {feature: slice_count, range: {min: 15}}
          - {feature: geometry_consistent, equals: true}
        prefer:
          - {feature: acquired_at, order: highest}     # the latest acquisition (a re-scan)
          - {feature: slice_thickness, order: lowest}  # then thinner slices
          - {feature: slice_count, order: highest}     # then more slices

**Conditions.** A condition names what it looks at and one test:

- ``tag: Keyword``: any DICOM keyword (SeriesDescription, ScanOptions, RepetitionTime,
  ImageType...), read from the series' first instance (lowest InstanceNumber); for Enhanced
  MR, a keyword absent at the top level is looked up in the functional groups (shared,
  then the first frame's). A multi-valued element reads as its values joined by ``\\``
  (``ORIGINAL\\PRIMARY\\M\\ND``) unless compared with a list.
- ``feature: name``: a derived feature (:data:`aiworker.select.features.FEATURE_NAMES`:
  plane, obliquity_deg, weighting, fat_suppressed, localizer, original, slice_count,
  geometry_consistent, slice_thickness, rows, columns, acquired_at, ...).

Tests (exactly one per condition):

- ``equals: value``: the same value; text compares without regard to case, numbers as
  numbers, a list value by value.
- ``one_of: [a, b, ...]``: equals one of them.
- ``regex: pattern``: a Python regular expression found anywhere in the value, ignoring
  case (anchor it with ``^...$`` to match the whole value).
- ``range: {min: a, max: b}``: a number within the bounds (inclusive; either may be left
  out); for a multi-valued element, every value.
- ``present: true`` / ``present: false``: the value exists and is not empty, or not.

Combinators nest conditions: ``all: [...]`` (every one), ``any: [...]`` (at least one) and
``not: {...}``. A role's ``require`` list is an ``all``.

**Reasons.** A series that fails a role is explained by the first condition it fails, in
words an administrator can act on, with the evidence for a derived feature: ``plane is
coronal (2° from coronal), needs sagittal``; ``slice_count is 12, needs at least 15``;
``geometry_consistent is false (missing slice: gap of 8.00 mm after slice 7 of 19 (spacing
4.00 mm)), needs true``; ``excluded: SeriesDescription MPR SAG matches /mpr/``; ``none of:
...; ...``.

**Preferences** name a tag or feature and an ``order``: ``highest`` or ``lowest`` (text such as
``acquired_at`` orders as written, which for ISO dates is time order). A series without the
value ranks after those with it. When every preference ties, the higher series number wins.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydicom.datadict import tag_for_keyword

import aiworker
from aiworker.select.conditions import (
    All,
    AnyOf,
    Condition,
    Equals,
    Not,
    OneOf,
    Operand,
    Preference,
    Present,
    Range,
    Regex,
    Role,
    RuleSet,
)
from aiworker.select.features import FEATURE_NAMES

OPERATORS = ("equals", "one_of", "regex", "range", "present")
COMBINATORS = ("all", "any", "not")
ORDERS = ("highest", "lowest")
INSTALL_ROOT = Path(aiworker.__file__).resolve().parents[1]


class RuleError(ValueError):
    """A rule file that cannot be used; ``problems`` has one line per problem, each naming
    the file and the key."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def load_rules(path: Path) -> RuleSet:
    """Read and check the rule file at ``path``; raises :class:`RuleError`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise RuleError([f"{path}: cannot read the rule file: {exc.strerror}"]) from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RuleError([f"{path}: not valid YAML: {exc}"]) from exc
    return parse_rules(raw, str(path), hashlib.sha256(text.encode()).hexdigest())


def resolve_rules_path(path: Path) -> Path:
    """Where a configured rule file is: an absolute path as is; a relative one under the
    working directory (like every path in the config) or, failing that, under aiworker's
    installation folder, where the bundled ``config/rules/`` ship."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    bundled = INSTALL_ROOT / path
    return bundled if bundled.exists() else path


def parse_rules(raw: Any, source: str, sha256: str = "") -> RuleSet:
    """Check a rule file's content (already read from YAML); raises :class:`RuleError` with
    every problem found."""
    problems: list[str] = []
    parser = _Parser(source, problems)
    rule_set = parser.rule_set(raw)
    if problems:
        raise RuleError(problems)
    return RuleSet(source, rule_set[0], rule_set[1], sha256)


class _Parser:
    """Builds conditions from YAML, collecting one problem line per mistake."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems

    def problem(self, where: str, message: str) -> None:
        self.problems.append(f"{self.source}: {where}: {message}")

    def rule_set(self, raw: Any) -> tuple[str, tuple[Role, ...]]:
        if not isinstance(raw, dict):
            self.problem("(top level)", "must be a mapping with 'roles'")
            return "", ()
        self._unknown_keys(raw, ("description", "roles"), "(top level)")
        roles = raw.get("roles")
        if not isinstance(roles, dict) or not roles:
            self.problem("roles", "must map each role name to its require/prefer")
            return "", ()
        return (str(raw.get("description", "")),
                tuple(self.role(str(name), spec) for name, spec in roles.items()))

    def role(self, name: str, raw: Any) -> Role:
        where = f"roles.{name}"
        if not isinstance(raw, dict):
            self.problem(where, "must be a mapping with 'require' (and optionally 'prefer')")
            return Role(name, "", All(()))
        self._unknown_keys(raw, ("description", "require", "prefer"), where)
        require = raw.get("require")
        if not isinstance(require, list) or not require:
            self.problem(f"{where}.require", "must be a list of conditions")
            require = []
        prefer = raw.get("prefer", [])
        if not isinstance(prefer, list):
            self.problem(f"{where}.prefer", "must be a list of {feature|tag, order}")
            prefer = []
        return Role(
            name=name,
            description=str(raw.get("description", "")),
            require=All(tuple(self.condition(c, f"{where}.require[{i}]")
                              for i, c in enumerate(require))),
            prefer=tuple(self.preference(p, f"{where}.prefer[{i}]")
                         for i, p in enumerate(prefer)),
        )

    def condition(self, raw: Any, where: str) -> Condition:
        if not isinstance(raw, dict):
            self.problem(where, "a condition must be a mapping, e.g. {feature: plane, "
                                "equals: sagittal}")
            return All(())
        combinators = [k for k in COMBINATORS if k in raw]
        if combinators:
            return self._combinator(raw, combinators, where)
        operand = self.operand(raw, where)
        tests = [k for k in OPERATORS if k in raw]
        self._unknown_keys(raw, ("tag", "feature", *OPERATORS), where)
        if len(tests) != 1:
            self.problem(where, f"needs exactly one test of {', '.join(OPERATORS)}"
                                f" (got {', '.join(tests) or 'none'})")
            return All(())
        return self._test(operand, tests[0], raw[tests[0]], f"{where}.{tests[0]}")

    def _combinator(self, raw: dict, found: list[str], where: str) -> Condition:
        if len(raw) != 1:
            self.problem(where, f"'{found[0]}' stands alone in its mapping "
                                f"(got {', '.join(map(str, raw))})")
        kind = found[0]
        value = raw[kind]
        if kind == "not":
            return Not(self.condition(value, f"{where}.not"))
        if not isinstance(value, list) or not value:
            self.problem(f"{where}.{kind}", "must be a list of conditions")
            return All(())
        children = tuple(self.condition(c, f"{where}.{kind}[{i}]") for i, c in enumerate(value))
        return All(children) if kind == "all" else AnyOf(children)

    def operand(self, raw: dict, where: str) -> Operand:
        kinds = [k for k in ("tag", "feature") if k in raw]
        if len(kinds) != 1:
            self.problem(where, "names exactly one of tag (a DICOM keyword) or feature")
            return Operand("feature", "plane")
        kind, name = kinds[0], str(raw[kinds[0]])
        if kind == "feature" and name not in FEATURE_NAMES:
            self.problem(f"{where}.feature", f"unknown feature {name!r} "
                                             f"(features: {', '.join(FEATURE_NAMES)})")
        if kind == "tag" and tag_for_keyword(name) is None:
            self.problem(f"{where}.tag", f"unknown DICOM keyword {name!r}")
        return Operand(kind, name)

    def _test(self, operand: Operand, test: str, value: Any, where: str) -> Condition:
        build: dict[str, Callable[[], Condition | None]] = {
            "equals": lambda: Equals(operand, value) if _scalar_or_list(value) else None,
            "one_of": lambda: (OneOf(operand, tuple(value))
                               if isinstance(value, list) and value else None),
            "regex": lambda: Regex(operand, value) if _valid_regex(value) else None,
            "range": lambda: _range(operand, value),
            "present": lambda: Present(operand, value) if isinstance(value, bool) else None,
        }
        condition = build[test]()
        if condition is None:
            self.problem(where, {
                "equals": "must be a value or a list of values",
                "one_of": "must be a non-empty list of values",
                "regex": "must be a valid regular expression",
                "range": "must be a mapping with min and/or max numbers",
                "present": "must be true or false",
            }[test] + f" (got {value!r})")
            return All(())
        return condition

    def preference(self, raw: Any, where: str) -> Preference:
        if not isinstance(raw, dict):
            self.problem(where, "must be a mapping {feature|tag: name, order: highest|lowest}")
            return Preference(Operand("feature", "slice_count"), "highest")
        self._unknown_keys(raw, ("tag", "feature", "order"), where)
        order = raw.get("order")
        if order not in ORDERS:
            self.problem(f"{where}.order", f"must be highest or lowest (got {order!r})")
        return Preference(self.operand(raw, where), str(order))

    def _unknown_keys(self, raw: dict, allowed: Sequence[str], where: str) -> None:
        for key in raw:
            if key not in allowed:
                self.problem(where, f"unknown key {key!r} (allowed: {', '.join(allowed)})")


def _scalar_or_list(value: Any) -> bool:
    items = value if isinstance(value, list) else [value]
    return bool(items) and all(isinstance(v, str | int | float | bool) for v in items)


def _valid_regex(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        re.compile(value)
    except re.error:
        return False
    return True


def _range(operand: Operand, value: Any) -> Range | None:
    if not isinstance(value, dict) or not value or set(value) - {"min", "max"}:
        return None
    bounds = [value.get("min"), value.get("max")]
    if any(b is not None and (isinstance(b, bool) or not isinstance(b, int | float))
           for b in bounds):
        return None
    return Range(operand, *bounds)
