"""Applying pipelines' rules to a study, explaining every verdict.

For each series of a study the features are derived once; then, for each pipeline and each
of its roles, every series gets a verdict (matched, or the first condition it failed), the
series that match are ranked by the role's preferences, and the best one is chosen. A
pipeline matches when each of its roles has a chosen series.

The decision serialises to the ``aiworker select --json`` shape (:meth:`StudyDecision.as_dict`,
documented in the README) and, one pipeline at a time, to the explanation the state DB keeps
(:meth:`StudyDecision.explanation`). :func:`changes` compares a stored decision with a new
one, for ``aiworker select --replay``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiworker.config import Config
from aiworker.select.conditions import Candidate, Role, RuleSet
from aiworker.select.features import (
    DEFAULT_SETTINGS,
    FeatureSettings,
    SeriesFeatures,
    compute_features,
)
from aiworker.select.headers import StudyHeaders, read_series, series_order
from aiworker.select.rules import RuleError, load_rules, resolve_rules_path


@dataclass(frozen=True)
class Pipeline:
    """What selection needs of a configured pipeline: its name, model and rules."""

    name: str
    model: str
    rules: RuleSet


def configured_pipelines(config: Config) -> list[Pipeline]:
    """The config's pipelines with their rule files read; raises RuleError naming the
    pipeline's key when a file is missing or wrong."""
    pipelines, problems = [], []
    for i, spec in enumerate(config.pipelines):
        path = resolve_rules_path(spec.rules)
        try:
            pipelines.append(Pipeline(spec.name, spec.model, load_rules(path)))
        except RuleError as exc:
            problems += [f"pipelines.{i}.rules ({spec.name}): {line}" for line in exc.problems]
    if problems:
        raise RuleError(problems)
    return pipelines


def feature_settings(config: Config) -> FeatureSettings:
    return FeatureSettings(oblique_above_deg=config.selection.oblique_above_deg,
                           spacing_tolerance=config.selection.spacing_tolerance)


@dataclass(frozen=True)
class Verdict:
    """One series against one role: matched or not, and why."""

    matched: bool
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"matched": self.matched, "reason": self.reason}


@dataclass
class SeriesDecision:
    """A series' features and its verdict for every ``pipeline/role``."""

    series_uid: str
    description: str
    features: SeriesFeatures
    candidate: Candidate
    verdicts: dict[str, Verdict] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """How a reason names this series: its number and description."""
        number = self.features.series_number
        name = f"series {number}" if number is not None else f"series {self.series_uid}"
        return f"{name} '{self.description}'" if self.description else name

    def as_dict(self, pipeline: str | None = None) -> dict[str, Any]:
        """The ``select --json`` shape of the series (verdicts of one pipeline if named)."""
        return {
            "series_uid": self.series_uid,
            "description": self.description,
            "features": self.features.as_dict(),
            "verdicts": {key: verdict.as_dict() for key, verdict in self.verdicts.items()
                         if pipeline is None or key.startswith(f"{pipeline}/")},
        }


@dataclass
class StudyDecision:
    """Every series' verdicts, and the series chosen for each pipeline's roles."""

    study_uid: str
    series: list[SeriesDecision]
    chosen: dict[str, dict[str, str | None]]
    rules: dict[str, RuleSet] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Exactly the documented ``aiworker select --json`` object of one study."""
        return {"study_uid": self.study_uid,
                "series": [s.as_dict() for s in self.series],
                "chosen": self.chosen}

    def matched(self, pipeline: str) -> bool:
        roles = self.chosen.get(pipeline, {})
        return bool(roles) and all(uid is not None for uid in roles.values())

    def reason(self, pipeline: str) -> str | None:
        """Why the pipeline found no match (None when it matched)."""
        if self.matched(pipeline):
            return None
        if not self.series:
            return "no readable image series in the study"
        missing = [role for role, uid in self.chosen.get(pipeline, {}).items() if uid is None]
        return "; ".join(f"role {role}: none of the {len(self.series)} series meets its "
                         "conditions" for role in missing) or "the pipeline has no roles"

    def explanation(self, pipeline: str) -> dict[str, Any]:
        """What the state DB keeps for one pipeline's decision on this study."""
        rules = self.rules.get(pipeline)
        return {
            "study_uid": self.study_uid,
            "pipeline": pipeline,
            "rules": rules.source if rules else None,
            "rules_sha256": rules.sha256 if rules else None,
            "matched": self.matched(pipeline),
            "chosen": self.chosen.get(pipeline, {}),
            "reason": self.reason(pipeline),
            "series": [s.as_dict(pipeline) for s in self.series],
        }


def decide(study: StudyHeaders, pipelines: list[Pipeline],
           settings: FeatureSettings = DEFAULT_SETTINGS) -> StudyDecision:
    """Derive the features of every series of ``study`` and apply each pipeline's rules."""
    series = []
    for headers in study.series:
        features = compute_features(headers, settings)
        series.append(SeriesDecision(headers.series_uid, headers.description, features,
                                     Candidate(features, headers.first)))
    decision = StudyDecision(study.study_uid, series, {},
                             {p.name: p.rules for p in pipelines})
    for pipeline in pipelines:
        decision.chosen[pipeline.name] = {
            role.name: _fill_role(role, f"{pipeline.name}/{role.name}", series)
            for role in pipeline.rules.roles
        }
    return decision


def _fill_role(role: Role, key: str, series: list[SeriesDecision]) -> str | None:
    """Give every series its verdict for ``role``; return the chosen series' UID."""
    matches = []
    for s in series:
        outcome = role.check(s.candidate)
        s.verdicts[key] = Verdict(outcome.ok, "meets every condition" if outcome.ok
                                  else outcome.text)
        if outcome.ok:
            matches.append(s)
    if not matches:
        return None
    ranked = sorted(matches, key=functools.cmp_to_key(
        lambda a, b: _compare(role, a, b)[0]))
    best = ranked[0]
    for other in ranked[1:]:
        why = _compare(role, best, other)[1]
        other.verdicts[key] = Verdict(True, f"meets every condition, but {best.label} is "
                                            f"preferred by {why}")
    if len(ranked) > 1:
        others = len(ranked) - 1
        why = _compare(role, best, ranked[1])[1]
        best.verdicts[key] = Verdict(True, f"chosen: meets every condition, preferred over "
                                           f"{others} other match{'es' if others > 1 else ''}"
                                           f" by {why}")
    else:
        best.verdicts[key] = Verdict(True, "chosen: meets every condition")
    return best.series_uid


def _compare(role: Role, a: SeriesDecision, b: SeriesDecision) -> tuple[int, str]:
    """Which of two matching series ranks first (negative: ``a``), and by what."""
    for preference in role.prefer:
        order = preference.compare(a.candidate, b.candidate)
        if order:
            winner, loser = (a, b) if order < 0 else (b, a)
            return order, preference.describe(winner.candidate, loser.candidate)
    numbers = (a.features.series_number or -1, b.features.series_number or -1)
    if numbers[0] != numbers[1]:
        return (-1 if numbers[0] > numbers[1] else 1), "the higher series number (a tie on " \
                                                        "every preference)"
    return (-1 if a.series_uid < b.series_uid else 1), "series UID order (a tie on everything)"


# --- replay -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """A role of a study whose chosen series differs under new rules."""

    study_uid: str
    pipeline: str
    role: str
    before: str | None  # series UID chosen by the stored decision
    after: str | None  # series UID the new rules choose
    recorded: bool  # False when the study had no stored decision for the pipeline
    why: str

    def as_dict(self) -> dict[str, Any]:
        return {"study_uid": self.study_uid, "pipeline": self.pipeline, "role": self.role,
                "before": self.before, "after": self.after, "recorded": self.recorded,
                "why": self.why}


def changes(stored: dict[str, Any] | None, decision: StudyDecision, pipeline: str
            ) -> list[Change]:
    """Each role whose chosen series under ``decision`` differs from the ``stored``
    explanation (as :meth:`StudyDecision.explanation` wrote it)."""
    before_roles = (stored or {}).get("chosen", {})
    by_uid = {s.series_uid: s for s in decision.series}
    found = []
    for role, after in decision.chosen.get(pipeline, {}).items():
        before = before_roles.get(role)
        if before == after:
            continue
        key = f"{pipeline}/{role}"
        reasons = []
        if after is not None:
            reasons.append(f"{by_uid[after].label}: {by_uid[after].verdicts[key].reason}")
        if before is not None and before in by_uid:
            reasons.append(f"{by_uid[before].label}: {by_uid[before].verdicts[key].reason}")
        elif before is not None:
            reasons.append("the series chosen before is no longer in the spool")
        found.append(Change(decision.study_uid, pipeline, role, before, after,
                            stored is not None, "; ".join(reasons)))
    return found


def describe_series(decision: StudyDecision, series_uid: str | None) -> str:
    """A chosen series as a table shows it: its label, or ``none``."""
    if series_uid is None:
        return "none"
    match = next((s for s in decision.series if s.series_uid == series_uid), None)
    return match.label if match else series_uid


def study_headers_from_paths(study_uid: str, paths_by_series: dict[str, list[str]]
                             ) -> StudyHeaders:
    """A spooled study's headers, read from the instance paths the state DB lists."""
    study = StudyHeaders(study_uid)
    for paths in paths_by_series.values():
        series = read_series(Path(p) for p in paths)
        if series is not None:
            study.series.append(series)
    study.series.sort(key=series_order)
    return study

