"""How a selection rule judges a series: the parts a parsed rule file is made of.

:mod:`aiworker.select.rules` documents the rule language and turns a rule file into these
objects; here is what they do with a series once built. A :class:`Condition` checks one
:class:`Candidate` (a series' derived features and its first instance's header) and says
why it holds or fails (an :class:`Outcome`, whose text is the reason an administrator
reads); a :class:`Preference` ranks two candidates; a :class:`Role` is one series a
pipeline needs (its required conditions and its preferences); a :class:`RuleSet` is a
whole rule file.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset

from aiworker.select.features import SeriesFeatures
from aiworker.select.headers import lookup


@dataclass(frozen=True)
class Candidate:
    """What a rule sees of one series: its derived features and its first instance's header."""

    features: SeriesFeatures
    header: Dataset


@dataclass(frozen=True)
class Outcome:
    """A condition's result; ``text`` says what was found, as a reason when ``ok`` is false."""

    ok: bool
    text: str


# --- operands -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Operand:
    """What a condition or preference looks at: a DICOM keyword or a derived feature."""

    kind: str  # "tag" | "feature"
    name: str

    def value(self, candidate: Candidate) -> Any:
        if self.kind == "feature":
            return getattr(candidate.features, self.name)
        return lookup(candidate.header, self.name)

    def found(self, candidate: Candidate) -> str:
        """``name is value`` with the evidence for a derived feature."""
        why = candidate.features.why(self.name) if self.kind == "feature" else None
        shown = show(self.value(candidate))
        return f"{self.name} is {shown}" + (f" ({why})" if why and why != shown else "")


def show(value: Any) -> str:
    """A value as a reason quotes it."""
    if value is None:
        return "missing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "\\".join(show(v) for v in value) if value else "empty"
    return str(value) if str(value) != "" else "empty"


# --- conditions ---------------------------------------------------------------------------


class Condition:
    """A test of one series; :meth:`check` says whether it holds and why (or why not)."""

    def check(self, candidate: Candidate) -> Outcome:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class Equals(Condition):
    operand: Operand
    expected: Any

    def check(self, candidate: Candidate) -> Outcome:
        ok = same(self.operand.value(candidate), self.expected)
        return _leaf(ok, self.operand.found(candidate), f"needs {show(self.expected)}")


@dataclass(frozen=True)
class OneOf(Condition):
    operand: Operand
    allowed: tuple[Any, ...]

    def check(self, candidate: Candidate) -> Outcome:
        value = self.operand.value(candidate)
        ok = any(same(value, allowed) for allowed in self.allowed)
        return _leaf(ok, self.operand.found(candidate),
                     "needs one of " + ", ".join(show(v) for v in self.allowed))


@dataclass(frozen=True)
class Regex(Condition):
    operand: Operand
    pattern: str

    def check(self, candidate: Candidate) -> Outcome:
        value = self.operand.value(candidate)
        ok = value is not None and re.search(self.pattern, show(value), re.IGNORECASE) is not None
        if ok:
            return Outcome(True, f"{self.operand.name} {show(value)} matches /{self.pattern}/")
        return Outcome(False, f"{self.operand.found(candidate)}, needs to match /{self.pattern}/")


@dataclass(frozen=True)
class Range(Condition):
    operand: Operand
    minimum: float | None
    maximum: float | None

    def check(self, candidate: Candidate) -> Outcome:
        values = self.operand.value(candidate)
        numbers = [_number(v) for v in (values if isinstance(values, list) else [values])]
        ok = bool(numbers) and all(n is not None and self._within(n) for n in numbers)
        return _leaf(ok, self.operand.found(candidate), f"needs {self._bounds()}")

    def _within(self, number: float) -> bool:
        return ((self.minimum is None or number >= self.minimum)
                and (self.maximum is None or number <= self.maximum))

    def _bounds(self) -> str:
        if self.maximum is None:
            return f"at least {self.minimum:g}"
        if self.minimum is None:
            return f"at most {self.maximum:g}"
        return f"between {self.minimum:g} and {self.maximum:g}"


@dataclass(frozen=True)
class Present(Condition):
    operand: Operand
    wanted: bool

    def check(self, candidate: Candidate) -> Outcome:
        value = self.operand.value(candidate)
        present = value not in (None, "", [])
        if present:
            found = f"{self.operand.name} is present ({show(value)})"
        else:
            found = f"{self.operand.name} is absent"
        return _leaf(present == self.wanted, found,
                     "needs it present" if self.wanted else "needs it absent")


@dataclass(frozen=True)
class All(Condition):
    conditions: tuple[Condition, ...]

    def check(self, candidate: Candidate) -> Outcome:
        texts = []
        for condition in self.conditions:
            outcome = condition.check(candidate)
            if not outcome.ok:
                return outcome
            texts.append(outcome.text)
        return Outcome(True, " and ".join(texts))


@dataclass(frozen=True)
class AnyOf(Condition):
    conditions: tuple[Condition, ...]

    def check(self, candidate: Candidate) -> Outcome:
        outcomes = [condition.check(candidate) for condition in self.conditions]
        passed = next((o for o in outcomes if o.ok), None)
        if passed:
            return passed
        return Outcome(False, "none of: " + "; ".join(o.text for o in outcomes))


@dataclass(frozen=True)
class Not(Condition):
    condition: Condition

    def check(self, candidate: Candidate) -> Outcome:
        outcome = self.condition.check(candidate)
        if outcome.ok:
            return Outcome(False, f"excluded: {outcome.text}")
        return Outcome(True, f"not excluded ({outcome.text})")


def _leaf(ok: bool, found: str, needs: str) -> Outcome:
    return Outcome(ok, found if ok else f"{found}, {needs}")


def same(actual: Any, expected: Any) -> bool:
    """Equality as rules mean it: booleans exactly, numbers as numbers, text ignoring case
    and surrounding spaces, lists value by value (a multi-valued actual compared with one
    text value compares its backslash-joined form)."""
    if isinstance(expected, bool) or isinstance(actual, bool):
        return isinstance(actual, bool) and isinstance(expected, bool) and actual == expected
    if isinstance(expected, list):
        return (isinstance(actual, list) and len(actual) == len(expected)
                and all(same(a, e) for a, e in zip(actual, expected, strict=True)))
    if isinstance(expected, int | float):
        number = _number(actual)
        return number is not None and math.isclose(number, expected, rel_tol=1e-9, abs_tol=1e-9)
    if actual is None:
        return False
    return show(actual).strip().upper() == str(expected).strip().upper()


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# --- preferences, roles, rule sets --------------------------------------------------------


@dataclass(frozen=True)
class Preference:
    """Rank candidates by one value, ``highest`` or ``lowest`` first."""

    operand: Operand
    order: str

    def compare(self, a: Candidate, b: Candidate) -> int:
        """Negative when ``a`` ranks before ``b``, positive after, 0 on a tie."""
        x, y = _orderable(self.operand.value(a)), _orderable(self.operand.value(b))
        if x == y:
            return 0
        if x is None or y is None:
            return 1 if x is None else -1
        try:
            before = x > y if self.order == "highest" else x < y
        except TypeError:  # text against a number: order as text
            before = str(x) > str(y) if self.order == "highest" else str(x) < str(y)
        return -1 if before else 1

    def describe(self, winner: Candidate, loser: Candidate) -> str:
        return (f"{self.operand.name} ({self.order}: {show(self.operand.value(winner))} "
                f"over {show(self.operand.value(loser))})")


def _orderable(value: Any) -> Any:
    if value in (None, "", []):
        return None
    number = _number(value[0] if isinstance(value, list) else value)
    return number if number is not None else show(value)


@dataclass(frozen=True)
class Role:
    """One series a pipeline needs: what it must be, and how to choose among several."""

    name: str
    description: str
    require: All
    prefer: tuple[Preference, ...] = ()

    def check(self, candidate: Candidate) -> Outcome:
        return self.require.check(candidate)


@dataclass(frozen=True)
class RuleSet:
    """A parsed rule file."""

    source: str  # the file it was read from
    description: str
    roles: tuple[Role, ...]
    sha256: str = field(default="")  # of the file's text: which rules made a decision
