"""``select``: series selection as a dry run over a folder, or a replay of the
spool's studies against new rules (:mod:`aiworker.select.replay`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from aiworker.config import Config
from aiworker.config_loader import DEFAULT_CONFIG

if TYPE_CHECKING:  # the commands import their stages lazily, to start fast
    from aiworker.select.decide import Pipeline, StudyDecision

from aiworker.cli.common import (
    ConfigOption,
    app,
    console,
    err,
    node_db,
    select_config,
    since_seconds,
)

RulesOption = Annotated[list[Path] | None, typer.Option(
    "--rules", help="A rule file (repeatable); default: the configured pipelines' rule files.")]


PipelineOption = Annotated[str | None, typer.Option(
    "--pipeline", help="The pipeline a --rules file stands for; default: the configured "
                       "pipeline, when there is one, else the file's name.")]


@app.command()
def select(
    path: Annotated[Path | None, typer.Argument(
        help="A folder of DICOM files (any nesting), or a spooled study folder.")] = None,
    rules: RulesOption = None,
    pipeline: PipelineOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False,
    replay: Annotated[bool, typer.Option(
        "--replay", help="Run the rules over the studies in the spool and list what would "
                         "now be selected differently; creates no jobs.")] = False,
    since: Annotated[str | None, typer.Option(
        help="With --replay: only studies completed within this long (30m, 12h, 7d, 2w).")
    ] = None,
    config: ConfigOption = DEFAULT_CONFIG,
) -> None:
    """Dry-run series selection: each study's series, features, verdicts and choice."""
    from aiworker.select.decide import decide, feature_settings
    from aiworker.select.headers import scan_folder

    since_s = since_seconds(since)
    cfg = select_config(config)
    pipelines = _select_pipelines(cfg, rules, pipeline)
    if replay:
        _replay(cfg, pipelines, since_s, as_json)
        return
    if path is None:
        err.print("select needs PATH (a folder of DICOM files), or --replay")
        raise typer.Exit(2)
    if not path.exists():
        err.print(f"no such file or folder: {path}")
        raise typer.Exit(2)
    studies, skipped = scan_folder(path)
    decisions = [decide(study, pipelines, feature_settings(cfg)) for study in studies]
    if as_json:
        print(json.dumps([d.as_dict() for d in decisions], indent=2))
    else:
        for decision in decisions:
            _print_decision(decision)
        if skipped:
            console.print(f"skipped {skipped} files that are not DICOM")
    if not studies:
        err.print(f"no DICOM series found under {path}")
        raise typer.Exit(1)


def _select_pipelines(cfg: Config, rules: list[Path] | None, name: str | None
                      ) -> list[Pipeline]:
    """The configured pipelines, or one per ``--rules`` file (named as --pipeline says)."""
    from aiworker.select.decide import Pipeline, configured_pipelines
    from aiworker.select.rules import RuleError, load_rules

    try:
        if not rules:
            pipelines = configured_pipelines(cfg)
        else:
            models = {p.name: p.model for p in cfg.pipelines}
            names = [name or (cfg.pipelines[0].name if len(cfg.pipelines) == 1 else file.stem)
                     for file in rules]
            pipelines = [Pipeline(n, models.get(n, ""), load_rules(file))
                         for n, file in zip(names, rules, strict=True)]
    except RuleError as exc:
        for line in exc.problems:
            print(f"rules error: {line}", file=sys.stderr)
        raise typer.Exit(2) from exc
    if not pipelines:
        err.print("no pipelines configured: pass --rules FILE")
        raise typer.Exit(2)
    return pipelines


def _print_decision(decision: StudyDecision) -> None:
    """One study's dry run: a table of series, features and verdicts, then the choice."""
    from aiworker.select.decide import describe_series

    keys = sorted({key for s in decision.series for key in s.verdicts})
    table = Table(title=f"study {decision.study_uid}", title_justify="left")
    for column in ("#", "description", "plane", "weighting", "FS", "slices"):
        table.add_column(column, no_wrap=True)
    for key in keys:
        table.add_column(key, overflow="fold", ratio=1)
    for s in decision.series:
        f = s.features
        table.add_row(str(f.series_number or ""), s.description, f.plane, f.weighting,
                      "yes" if f.fat_suppressed else "no", str(f.slice_count),
                      *(s.verdicts[k].reason for k in keys))
    console.print(table)
    for pipeline, roles in decision.chosen.items():
        if decision.matched(pipeline):
            chosen = ", ".join(f"{role}: {describe_series(decision, uid)}"
                               for role, uid in roles.items())
            console.print(f"  {pipeline}: {chosen}", highlight=False)
        else:
            console.print(f"  {pipeline}: no match: {decision.reason(pipeline)}", highlight=False)


def _replay(cfg: Config, pipelines: list[Pipeline], since_s: float | None, as_json: bool
            ) -> None:
    """Print what the rules would now choose differently (:mod:`aiworker.select.replay`)."""
    from aiworker.select.decide import feature_settings
    from aiworker.select.replay import replay

    db = node_db(cfg, "select --replay", "nothing to replay")
    try:
        result = replay(db, pipelines, feature_settings(cfg), since_s)
    finally:
        db.close()
    if as_json:
        print(json.dumps({"studies_checked": result.studies_checked,
                          "changes": [c.change.as_dict() for c in result.changes]}, indent=2))
        return
    rule_files = ", ".join(p.rules.source for p in pipelines)
    console.print(f"{result.studies_checked} complete studies checked with {rule_files}: "
                  f"{len(result.changes)} selections would change", highlight=False)
    if result.changes:
        table = Table(title="would now be selected differently", title_justify="left")
        for column in ("study", "pipeline/role", "before", "after", "why"):
            table.add_column(column, overflow="fold")
        for found in result.changes:
            change = found.change
            table.add_row(change.study_uid, f"{change.pipeline}/{change.role}",
                          found.before if change.recorded else "(no decision recorded)",
                          found.after, change.why)
        console.print(table)
