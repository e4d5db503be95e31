"""Commands that run without a node: ``infer``, ``train-demo``, ``phantom`` and
``demo``."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import Progress

from aiworker.config import Config
from aiworker.config_loader import DEFAULT_CONFIG

if TYPE_CHECKING:  # the commands import their stages lazily, to start fast
    from aiworker.offline import Run

from aiworker.cli.common import (
    AETOption,
    ConfigOption,
    app,
    console,
    err,
    select_config,
)


@app.command()
def infer(
    path: Annotated[Path, typer.Argument(
        exists=True, help="A study folder, or a folder of studies (DICOM files, any nesting).")],
    out: Annotated[Path, typer.Option("--out", help="Each study's files go to "
                                                    "OUT/<StudyInstanceUID>/.")],
    model: Annotated[str | None, typer.Option(
        help="name or name@version; default: the configured pipeline's model.")] = None,
    device: Annotated[str | None, typer.Option(
        help="auto, cpu, cuda or cuda:N; default: inference.device from the config.")] = None,
    models_dir: Annotated[Path | None, typer.Option(
        help="A folder of site models (<folder>/model.yaml) beside the bundled ones; "
             "default: inference.models_dir from the config.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False,
    config: ConfigOption = DEFAULT_CONFIG,
) -> None:
    """Offline selection and inference over a folder of studies: per study a label volume
    (NIfTI), findings and timings. Exit code 1 when any study has no result."""
    from aiworker import offline
    from aiworker.select.headers import scan_folder

    run = _infer_run(select_config(config), model, device, models_dir, out)
    studies, _skipped = scan_folder(path)
    if not studies:
        err.print(f"no DICOM series found under {path}")
        raise typer.Exit(1)
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task(f"inference ({run.engine.model_id})", total=len(studies))
        results = offline.run_studies(studies, run, on_done=lambda _r: bar.advance(task))
    if as_json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        console.print(offline.summary_table(results))
        for line in offline.problem_lines(results):
            console.print(line, highlight=False, soft_wrap=True)
    raise typer.Exit(0 if all(r.status == offline.DONE for r in results) else 1)


def _infer_run(cfg: Config, model: str | None, device: str | None, models_dir: Path | None,
               out: Path) -> Run:
    """The pipeline and the loaded engine ``infer`` runs; a problem exits with code 2."""
    from aiworker.infer.manifest import ManifestError, ModelError
    from aiworker.offline import OfflineError, Run, load_engine, pick_pipeline
    from aiworker.select.decide import configured_pipelines, feature_settings
    from aiworker.select.rules import RuleError

    device = device or cfg.inference.device
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise typer.BadParameter("use auto, cpu, cuda or cuda:N", param_hint="--device")
    try:
        pipeline = pick_pipeline(configured_pipelines(cfg), model)
        engine = load_engine(model or pipeline.model, models_dir or cfg.inference.models_dir,
                             device)
    except (RuleError, ManifestError) as exc:
        for line in exc.problems:
            print(f"infer: {line}", file=sys.stderr)
        raise typer.Exit(2) from exc
    except (OfflineError, ModelError) as exc:
        err.print(f"infer: {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from exc
    return Run(pipeline, engine, feature_settings(cfg), out, cfg.hl7.model_dump())


@app.command("train-demo")
def train_demo(
    seed: Annotated[int | None, typer.Option(help="Seed of everything random (default 0).")] = None,
    cases: Annotated[int | None, typer.Option(
        help="Domain-randomised samples in the training pool (default 160).")] = None,
    fit_cases: Annotated[int | None, typer.Option(
        help="Studies the ACL head is fitted on (default 80).")] = None,
    iterations: Annotated[int | None, typer.Option(
        help="Training iterations (default 4500).")] = None,
    max_minutes: Annotated[float | None, typer.Option(
        help="Stop after this long, keeping the best weights so far.")] = None,
    init: Annotated[Path | None, typer.Option(
        help="Weights to start from (a fine-tune), e.g. the bundled model.pt.")] = None,
    workers: Annotated[int | None, typer.Option(
        help="Processes drawing the studies (default: one per CPU).")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Where model.pt and model.yaml go (default: the bundled knee_demo folder).")] = None,
) -> None:
    """Train the bundled knee-demo model on phantoms (python -m aiworker.models.knee_demo.train
    has every option)."""
    from aiworker.models.knee_demo import train

    options = {"--seed": seed, "--cases": cases, "--fit-cases": fit_cases,
               "--iterations": iterations, "--max-minutes": max_minutes, "--init": init,
               "--workers": workers, "--out": out}
    train.main([arg for flag, value in options.items() if value is not None
                for arg in (flag, str(value))])


@app.command()
def phantom(
    out_dir: Path,
    cases: Annotated[int, typer.Option(min=1, help="How many studies (case-0000, ...).")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the first case; case i uses seed + i.")] = 0,
    vendor: Annotated[str, typer.Option(
        help="siemens, ge, philips, or random (per case).")] = "random",
    acl: Annotated[str, typer.Option(help="random, intact or torn.")] = "random",
    side: Annotated[str, typer.Option(help="R, L, or random (per case).")] = "random",
    transfer_syntax: Annotated[str, typer.Option(
        help="explicit, implicit, jpeg2000, jpegls or rle (lossless).")] = "explicit",
    enhanced: Annotated[bool, typer.Option(
        help="Write each series as one Enhanced MR multi-frame instance.")] = False,
    rescan_probability: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Chance that a case has a re-scanned series.")] = 0.2,
    derived_probability: Annotated[float, typer.Option(
        min=0.0, max=1.0,
        help="Chance that a case has a reformat (MPR) of its sagittal PD FS.")] = 0.2,
    descriptions: Annotated[str, typer.Option(
        help="vendor, generic, empty, or random (per case, see --plain-descriptions).")
    ] = "random",
    plain_descriptions: Annotated[float, typer.Option(
        min=0.0, max=1.0,
        help="With --descriptions random: chance of generic or empty descriptions.")] = 0.25,
    max_oblique: Annotated[float, typer.Option(
        min=0.0, max=20.0, help="Largest oblique angle of a plane, degrees.")] = 15.0,
    series: Annotated[str | None, typer.Option(
        help="Comma-separated roles instead of the routine protocol, e.g. "
             "sag_pd_fs,cor_pd_fs,ax_t2_fs.")] = None,
    matrix: Annotated[int | None, typer.Option(
        min=16, max=1024, help="Rows and columns of every series.")] = None,
    slices: Annotated[int | None, typer.Option(
        min=1, help="Slices of every series but the localizer.")] = None,
    patient_name: Annotated[str | None, typer.Option(
        help="DICOM PN, e.g. 'MÜLLER^JÖRG'; default: drawn per case.")] = None,
    truth: Annotated[bool, typer.Option(help="Write the ground truth beside each study.")
                     ] = True,
) -> None:
    """Write synthetic knee MR studies with ground truth to OUT_DIR/case-NNNN/."""
    from aiworker.phantom.protocol import Overrides
    from aiworker.phantom.study import StudyOptions, write_study

    roles = tuple(r.strip() for r in series.split(",") if r.strip()) if series else None
    options = StudyOptions(
        vendor=None if vendor == "random" else vendor, acl=acl,
        side=None if side == "random" else side, transfer_syntax=transfer_syntax,
        enhanced=enhanced, rescan_probability=rescan_probability,
        derived_probability=derived_probability,
        descriptions=None if descriptions == "random" else descriptions,
        plain_descriptions_probability=plain_descriptions, max_oblique=max_oblique,
        patient_name=patient_name, overrides=Overrides(roles, matrix, slices), truth=truth)
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("writing studies", total=cases)
        for index in range(cases):
            case_dir = out_dir / f"case-{index:04d}"
            try:
                study = write_study(case_dir, replace(options, seed=seed + index))
            except (ValueError, RuntimeError) as exc:  # a bad option; an encoder missing
                err.print(f"phantom: {exc}", highlight=False, soft_wrap=True)
                raise typer.Exit(2) from exc
            acl_state = "torn" if study.case.acl_torn else "intact"
            console.print(f"{case_dir}: {study.plan.vendor.key} {study.plan.scanner.model},"
                          f" {len(study.series)} series, {len(study.files)} files, "
                          f"{study.case.side} knee, ACL {acl_state}", highlight=False,
                          soft_wrap=True)
            bar.advance(task)


@app.command()
def demo(
    workdir: Annotated[Path | None, typer.Option(
        help="Folder for the study, the node's data and what arrives; default: a new "
             "temporary folder (kept).")] = None,
    keep: Annotated[bool, typer.Option(
        help="Keep the node and the stand-in PACS and RIS running until Ctrl-C.")] = False,
    to: Annotated[str | None, typer.Option(
        "--to", help="HOST:PORT of a running node: only send it the phantom study.")] = None,
    aet: AETOption = "AIWORKER",
    timeout: Annotated[float, typer.Option(min=1, help="Seconds to wait for the results.")
                       ] = 300.0,
) -> None:
    """See it work: a phantom knee study through a throwaway node to a stand-in PACS and RIS."""
    from aiworker.demo import DemoError, push_study, run_demo

    try:
        if to is None:
            run_demo(workdir, timeout, keep, console)
        else:
            host, _, port = to.rpartition(":")
            if not host or not port.isdigit():
                err.print(f"demo: --to wants HOST:PORT, not {to!r}", highlight=False)
                raise typer.Exit(2)
            push_study(host, int(port), aet, workdir, console)
    except DemoError as exc:
        err.print(f"demo failed: {exc}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(1) from exc
