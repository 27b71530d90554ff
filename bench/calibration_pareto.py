"""Pareto evidence for calibration on the demo model: mean sparsity vs PSNR/SSIM to the dense
video, on held-out prompts and seeds, for fixed thresholds (with and without dense warm-up steps)
and for calibrated profiles at several budgets.

    PYTHONPATH=src python bench/calibration_pareto.py --part fixed --out docs/calibration
    PYTHONPATH=src python bench/calibration_pareto.py --part calibrated --out docs/calibration
    PYTHONPATH=src python bench/calibration_pareto.py --part report --out docs/calibration

Each part appends one JSON line per configuration to OUT/results.jsonl as it finishes (so the
parts can run in parallel and a cut-short run keeps what it measured); ``report`` writes
OUT/pareto.md (the table) and OUT/pareto.png. Every configuration is sampled with the operator
itself (``apply_lite_attention``; the reference backend on the CPU), one held-out video at a
time, and compared with that video's dense sample (plain SDPA).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from liteattention.calibration import Budget, load_profile
from liteattention.calibration.search import DEFAULT_GRID, Calibrator
from liteattention.commands.calibrate import demo_generator
from liteattention.demo import video_psnr, video_ssim
from liteattention.integrations import apply_lite_attention
from liteattention.models import generate_video, load_demo_model
from liteattention.models.video_data import DEMO_PROMPTS

STEPS, BLOCK = 20, 64
CALIBRATION = (DEMO_PROMPTS[:2], (0,))  # prompts, seeds
HELD_OUT = [(DEMO_PROMPTS[2], 1), (DEMO_PROMPTS[3], 2)]  # other prompts, other seeds
# (threshold, dense warm-up steps), most informative first: a cut-short run keeps those.
FIXED = [(-6.0, 4), (-4.0, 4), (-6.0, 0), (-3.0, 4), (-4.0, 0), (-8.0, 4), (-2.0, 4), (-2.0, 0), (-8.0, 0), (-4.0, 2), (-3.0, 0), (-2.5, 4)]
# (per-call rel-L2 selection bound, ramp): one trajectory each. With the ramp the marks of step t
# are selected within bound * (t + 1) / (steps - 1) (calibrate's default); without it, within the
# bound at every step.
BUDGETS = [(0.02, True), (0.05, True), (0.005, False), (0.01, True), (0.01, False), (0.1, True)]


def _dense(model):
    return [generate_video(model, p, num_steps=STEPS, seed=s, progress=False).frames for p, s in HELD_OUT]


def evaluate(model, dense, **apply):
    """Held-out videos with LiteAttention (``apply``: threshold= or profile=): mean sparsity over
    steps, layers, branches and videos; PSNR and SSIM per video."""
    sparsity, psnr, ssim = [], [], []
    for (prompt, seed), reference in zip(HELD_OUT, dense, strict=True):
        handle = apply_lite_attention(model.transformer, block_m=None if "profile" in apply else BLOCK,
                                      block_n=None if "profile" in apply else BLOCK, **apply)
        try:
            video = generate_video(model, prompt, num_steps=STEPS, seed=seed, progress=False).frames
            stats = handle.stats()
        finally:
            handle.remove()
        sparsity.append(float(np.mean([row for branch in stats.values() for row in branch.values()])))
        psnr.append(video_psnr(reference, video))
        ssim.append(video_ssim(reference, video))
    return {"sparsity": float(np.mean(sparsity)), "psnr": float(np.mean(psnr)), "psnr_min": float(min(psnr)),
            "ssim": float(np.mean(ssim)), "psnr_per_video": psnr}


def _append(out: Path, row: dict) -> None:
    with (out / "results.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def run_fixed(model, out: Path) -> None:
    done = {(r["threshold"], r["warmup"]) for r in _rows(out) if r["kind"] == "fixed"}
    todo = [config for config in FIXED if config not in done]  # a rerun resumes
    dense = _dense(model) if todo else None
    for threshold, warmup in todo:
        start = time.perf_counter()
        schedule = [-math.inf] * warmup + [threshold] * (STEPS - warmup)
        row = evaluate(model, dense, threshold=schedule)
        _append(out, {"kind": "fixed", "threshold": threshold, "warmup": warmup, **row,
                      "seconds": time.perf_counter() - start})


def run_calibrated(model, out: Path) -> None:
    dense = None
    prompts, seeds = CALIBRATION
    for bound, ramp in BUDGETS:
        if (bound, ramp) in {(r["bound"], r["ramp"]) for r in _rows(out) if r["kind"] == "calibrated"}:
            continue  # another process measured it
        start = time.perf_counter()
        # One trajectory at this selection bound (what calibrate(max_error=...) runs first).
        cal = Calibrator(demo_generator(model, STEPS), model.transformer, prompts, seeds, metric="rel_l2",
                         grid=DEFAULT_GRID, block_m=BLOCK, block_n=BLOCK, ramp=ramp)
        cal.run_dense()
        trial = cal.trial(bound)
        profile = cal.profile(trial, Budget("rel_l2", max_error=bound), {"seconds": time.perf_counter() - start})
        seconds = time.perf_counter() - start
        path = profile.save(out / f"profile-rel_l2-{bound:g}{'' if ramp else '-uniform'}.json")
        dense = dense or _dense(model)
        row = evaluate(model, dense, profile=load_profile(path))
        cal = profile.calibration
        _append(out, {"kind": "calibrated", "bound": bound, "ramp": ramp, "profile": path.name, **row,
                      "calibration_sparsity": cal["mean_sparsity"], "calibration_psnr": cal["psnr_db"],
                      "calibration_seconds": seconds, "violations": cal["violations"]})


def _rows(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    for row in rows:  # rows of the first version of this script: uniform bounds, written as text
        if row["kind"] == "calibrated" and "bound" not in row:
            row.update(bound=float(row.pop("budget").split("<=")[1]), ramp=False)
    return rows


def _label(row: dict) -> str:
    if row["kind"] == "fixed":
        return f"fixed {row['threshold']:g}, {row['warmup']} dense steps"
    return f"calibrated, per-call rel-L2 <= {row['bound']:g}, {'ramp' if row['ramp'] else 'uniform'}"


def _series(row: dict):
    return ("fixed", row["warmup"]) if row["kind"] == "fixed" else ("calibrated", row["ramp"])


def report(out: Path) -> None:
    from matplotlib.figure import Figure

    rows = _rows(out)
    lines = ["| schedule | mean sparsity | PSNR (dB), mean / min | SSIM |", "|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: (r["kind"], -r["psnr"])):
        lines.append(f"| {_label(row)} | {100 * row['sparsity']:.1f}% | {row['psnr']:.2f} / {row['psnr_min']:.2f} | "
                     f"{row['ssim']:.4f} |")
    (out / "pareto.md").write_text("\n".join(lines) + "\n")
    figure = Figure(figsize=(10, 4), layout="constrained")
    left, right = figure.subplots(1, 2)
    for series in sorted({_series(r) for r in rows}, key=str):
        chosen = sorted((r for r in rows if _series(r) == series), key=lambda r: r["sparsity"])
        kind, detail = series
        label = (f"fixed thresholds, {detail} dense steps" if kind == "fixed"
                 else f"calibrated, {'ramp' if detail else 'uniform'} (per-call rel-L2 bounds)")
        style = "o--" if kind == "fixed" else "s-"
        x = [100 * r["sparsity"] for r in chosen]
        left.plot(x, [r["psnr"] for r in chosen], style, label=label)
        right.plot(x, [r["ssim"] for r in chosen], style, label=label)
    for ax, name in ((left, "PSNR to dense (dB)"), (right, "SSIM to dense")):
        ax.set_xlabel("mean tiles skipped (%)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle("Demo model, held-out prompts and seeds (higher and further right is better)", fontsize=10)
    figure.savefig(out / "pareto.png", dpi=110)
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("fixed", "calibrated", "report"), required=True)
    parser.add_argument("--out", type=Path, default=Path("docs/calibration"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part == "report":
        report(args.out)
        return
    torch.set_num_threads(1)
    model = load_demo_model("cpu", torch.float32)
    (run_fixed if args.part == "fixed" else run_calibrated)(model, args.out)


if __name__ == "__main__":
    main()
