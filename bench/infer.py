#!/usr/bin/env python3
"""Inference time per series: decode, preprocess, model, postprocess, resample and total.

Generates one study with the phantom (``aiworker phantom``: one sagittal PD FS series of
32 slices of 384x384, Siemens headers, seed 0), then runs the model (default: the bundled
``knee-demo``) on that series through :class:`aiworker.infer.engine.Engine`, one warm-up
run and ``--runs`` timed runs per device, and prints the median of each step:

* ``decode``: :func:`aiworker.infer.volume.load_series` on the DICOM files;
* ``preprocess``, ``model``, ``postprocess``, ``resample``: the timings ``Engine.run``
  returns (the model step is MONAI's sliding window; on a GPU under autocast to the
  manifest's AMP dtype, bf16 for knee-demo);
* ``total``: wall time of the whole run.

Devices: the CPU, and CUDA when torch sees a GPU; torch and SimpleITK use ``--threads``
threads (default 2: a 2-core CPU) throughout. The model's FLOPs for one series are counted
once, on the last device, with
``torch.utils.flop_counter.FlopCounterMode`` around the sliding-window model step
(convolutions and matrix products, a multiply-add counting 2); on a GPU the achieved
TFLOP/s of the median model step is compared with the card's bf16 dense peak. Peak RSS is
the process's VmHWM, reset before each device. A table, then one JSON line, are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from aiworker.infer.engine import Engine  # noqa: E402
from aiworker.infer.preprocess import model_input  # noqa: E402
from aiworker.infer.registry import Registry, model_id  # noqa: E402
from aiworker.infer.volume import load_series  # noqa: E402

STEPS = ("decode", "preprocess", "model", "postprocess", "resample", "total")
SERIES = {"role": "sag_pd_fs", "matrix": 384, "slices": 32, "seed": 0, "vendor": "siemens"}
# bf16 dense tensor-core peaks (TFLOP/s, no sparsity) by device name, first match wins
BF16_PEAKS = ((r"H200", "H200", 989.0), (r"H100.*PCIe", "H100 PCIe", 756.0),
              (r"H100.*NVL", "H100 NVL", 835.0), (r"H100", "H100 SXM", 989.0),
              (r"A100", "A100", 312.0), (r"\bL4\b", "L4", 121.0))
MIB = 2**20


def phantom_argv(out_dir: Path, cases: int = 1) -> list[str]:
    """The ``aiworker phantom`` command that writes the benchmark series (``cases``
    studies of it, seeds 0, 1, ...)."""
    return [sys.executable, "-m", "aiworker.cli", "phantom", str(out_dir),
            "--cases", str(cases), "--seed", str(SERIES["seed"]), "--vendor", SERIES["vendor"],
            "--series", SERIES["role"], "--matrix", str(SERIES["matrix"]),
            "--slices", str(SERIES["slices"]), "--rescan-probability", "0",
            "--derived-probability", "0", "--descriptions", "vendor", "--no-truth"]


def write_series(out_dir: Path) -> list[Path]:
    """Generate the study in a child process (its memory stays out of our peak RSS); return
    the files of its one series."""
    subprocess.run(phantom_argv(out_dir), cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    files = sorted(out_dir.rglob("*.dcm"))
    if len(files) != SERIES["slices"]:
        sys.exit(f"error: expected {SERIES['slices']} DICOM files under {out_dir}, "
                 f"found {len(files)}")
    return files


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process, where Linux allows it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss() -> int:
    """Peak resident bytes since the last reset (VmHWM), else since the process started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def one_run(engine: Engine, files: list[Path]) -> dict[str, float]:
    """Decode the series and run the engine on it; seconds per step and in total."""
    started = time.perf_counter()
    loaded = load_series(files)
    decode = time.perf_counter() - started
    result = engine.run([loaded])
    total = time.perf_counter() - started
    return {"decode": round(decode, 4), **result.timings, "total": round(total, 4)}


def count_flops(engine: Engine, files: list[Path]) -> int:
    """FLOPs of the sliding-window model step for one series, called as Engine.run does."""
    prepared = model_input([load_series(files).image], engine.manifest.input)
    with FlopCounterMode(display=False) as counter:
        engine.infer(prepared.array)
    return int(counter.get_total_flops())


def bf16_peak(name: str) -> tuple[str, float | None]:
    """The card's bf16 dense peak TFLOP/s from the table, by device name."""
    for pattern, card, tflops in BF16_PEAKS:
        if re.search(pattern, name):
            return card, tflops
    return "unknown", None


def bench_device(spec, device: str, files: list[Path], runs: int, flops: bool) -> dict:
    """One warm-up and ``runs`` timed runs on ``device``; the FLOPs counted when asked."""
    reset_peak_rss()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    engine = Engine(spec, device=device)
    one_run(engine, files)  # warm-up: allocator, kernels, caches
    timings = [one_run(engine, files) for _ in range(runs)]
    row = {"device": device, "name": device_name(device), "runs": runs,
           "median_s": {step: statistics.median(t[step] for t in timings) for step in STEPS},
           "runs_s": timings, "peak_rss_mib": round(peak_rss() / MIB, 1)}
    if device == "cuda":
        row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / MIB, 1)
    if flops:
        row["flops"] = count_flops(engine, files)
    del engine
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def add_rates(row: dict, flops: int) -> None:
    """The achieved TFLOP/s of the median model step; on a GPU, against its bf16 peak."""
    row["achieved_tflops"] = round(flops / row["median_s"]["model"] / 1e12, 3)
    if row["device"] == "cuda":
        card, peak = bf16_peak(row["name"])
        row |= {"bf16_peak_card": card, "bf16_peak_tflops": peak,
                "fraction_of_peak": round(row["achieved_tflops"] / peak, 4) if peak else None}


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model name."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def devices_for(choice: str) -> list[str]:
    """``auto``: the CPU, and CUDA when torch sees a GPU; else the one device asked for."""
    cuda = torch.cuda.is_available()
    if choice == "cuda" and not cuda:
        sys.exit("error: --device cuda, but torch sees no CUDA device")
    if choice == "auto":
        return ["cpu", "cuda"] if cuda else ["cpu"]
    return [choice]


def git_revision() -> str:
    """The repo's short commit, flagged when aiworker/ has uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True,
                              text=True).stdout.strip()

    try:
        rev, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain",
                                                                "--", "aiworker")
    except OSError:
        return "?"
    return (rev or "?") + (" + uncommitted changes in aiworker/" if dirty else "")


def print_table(rows: list[dict], flops: int) -> None:
    """Median seconds per step for each device, peak memory and achieved FLOP rate."""
    head = (f"{'device':<6} {'runs':>4} " + " ".join(f"{s:>11}" for s in STEPS)
            + f" {'peak RSS':>9} {'TFLOP/s':>8}")
    print("\nmedian seconds per series\n" + head + "\n" + "-" * len(head))
    for row in rows:
        print(f"{row['device']:<6} {row['runs']:>4} "
              + " ".join(f"{row['median_s'][s]:11.3f}" for s in STEPS)
              + f" {row['peak_rss_mib']:>5.0f} MiB {row['achieved_tflops']:8.3f}")
    print(f"\nmodel FLOPs per series: {flops / 1e9:.1f} GFLOP (FlopCounterMode around the "
          "sliding-window step; TFLOP/s = FLOPs / median model time)")
    for row in rows:
        if row["device"] != "cuda":
            continue
        print(f"cuda: {row['name']}, peak GPU memory {row['peak_gpu_mib']:.0f} MiB")
        if row["bf16_peak_tflops"]:
            print(f"cuda: achieved {row['achieved_tflops']:.2f} TFLOP/s = "
                  f"{100 * row['fraction_of_peak']:.2f} % of the {row['bf16_peak_card']} "
                  f"bf16 dense peak ({row['bf16_peak_tflops']:.0f} TFLOP/s)")
        else:
            print(f"cuda: achieved {row['achieved_tflops']:.2f} TFLOP/s; bf16 peak of "
                  "this card: unknown")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5,
                        help="timed runs per device after one warm-up (default 5)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto (default): the CPU, and CUDA when available")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch and SimpleITK threads (default 2: a 2-core CPU)")
    parser.add_argument("--model", default="knee-demo",
                        help="model name or name@version (default knee-demo)")
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="a site models folder besides the bundled models")
    parser.add_argument("--out-json", type=Path, default=None,
                        help="also write the JSON result to this file")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.threads < 1:
        parser.error("--runs and --threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    spec = Registry(models_dir=args.models_dir).get(args.model)
    devices = devices_for(args.device)
    print(f"model:    {model_id(spec)} ({spec.folder})")
    print(f"series:   {SERIES['role']}, {SERIES['slices']} slices of {SERIES['matrix']}x"
          f"{SERIES['matrix']}, generated with: aiworker phantom DIR "
          + " ".join(phantom_argv(Path("DIR"))[7:]))
    print(f"threads:  torch {torch.get_num_threads()}, SimpleITK {args.threads} "
          f"(machine: nproc {os.cpu_count()}, {device_name('cpu')})")
    print(f"software: python {platform.python_version()}, torch {torch.__version__}, "
          f"aiworker {git_revision()}")
    print(f"runs:     1 warm-up + {args.runs} timed per device on {', '.join(devices)}")
    with tempfile.TemporaryDirectory(prefix="bench-infer-") as tmp:
        files = write_series(Path(tmp))
        rows = []
        for device in devices:  # the FLOPs are counted once, on the last (fastest) device
            rows.append(bench_device(spec, device, files, args.runs, device == devices[-1]))
            print(f"  {device}: total {rows[-1]['median_s']['total']:.3f} s median", flush=True)
    flops = rows[-1].pop("flops")
    for row in rows:
        add_rates(row, flops)
    print_table(rows, flops)
    report = {"bench": "infer", "model": model_id(spec), "series": SERIES,
              "threads": args.threads, "flops_per_series": flops, "aiworker": git_revision(),
              "torch": torch.__version__, "devices": rows}
    if args.out_json:
        args.out_json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
