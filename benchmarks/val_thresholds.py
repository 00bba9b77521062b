"""How stable is the validation threshold? Youden's J under resampling of the validation split.

    python benchmarks/val_thresholds.py runs/default runs/quick [...]

For each run: its validation films scored and calibrated exactly as `cxr evaluate` does,
Youden's J threshold on them (what `cxr evaluate` deploys), then the same threshold on 1000
patient-level bootstrap resamples of the validation split: its median and 5-95% range, and
how many validation films lie between the plain and the median threshold. When validation
is saturated (a handful of films decide J), the range is wide and the plain threshold is
one draw from it. Then a framing-robust threshold: Youden's J over the validation films as
filmed plus the same films centre-cropped to 85% of their sides (the framing check's crop),
with what it costs on the films as filmed (balanced accuracy at each threshold).
The test split is never read.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cxrkit.evaluation.evaluate import FRAMING_THRESHOLD_CROP, choose_calibration
from cxrkit.evaluation.metrics import resample_weights, threshold_metrics
from cxrkit.evaluation.scoring import run_manifest, score
from cxrkit.evaluation.thresholds import youden_cuts
from cxrkit.labels import positive_index
from cxrkit.runs import load_model, softmax


def threshold_spread(run: Path, resamples: int) -> dict:
    model = load_model(run)
    positive = positive_index(model.spec.labels, model.spec.positive_label)
    val = score(model, [s for s in run_manifest(run) if s.split == "val"], f"{run} val")
    cropped = score(model, val.samples, f"{run} val (framed 85%)", crop=FRAMING_THRESHOLD_CROP)
    calibration, thresholds = choose_calibration(val, positive, None, framed_val=cropped)
    p = softmax(val.logits, calibration.temperature)[:, positive]
    y = val.y == positive
    cuts = np.concatenate([youden_cuts(y, p, w)
                           for w in resample_weights(val.groups, resamples, seed=0)])
    plain, median = thresholds["validation"], float(np.median(cuts))
    robust = thresholds["validation_framing"]
    lo, hi = sorted((plain, median))
    at_plain, at_robust = (threshold_metrics(y, p, t, np.ones((1, len(p))))
                           for t in (plain, robust))
    return {"plain": plain, "median": median, "p5": float(np.percentile(cuts, 5)),
            "p95": float(np.percentile(cuts, 95)),
            "normal_between": int(((p > lo) & (p < hi) & ~y).sum()),
            "pneumonia_between": int(((p > lo) & (p < hi) & y).sum()),
            "robust": robust, "plain_bal_acc": float(at_plain["balanced_accuracy"][0]),
            "robust_bal_acc": float(at_robust["balanced_accuracy"][0]),
            "robust_sens": float(at_robust["sensitivity"][0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()
    print("| run | Youden on validation | bootstrap median | bootstrap 5-95% | val films "
          "between (NORMAL / PNEUMONIA) | framing-robust | val balanced acc. plain / robust "
          "| val sens. at robust |")
    print("|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        s = threshold_spread(run, args.resamples)
        print(f"| `{run.name}` | {s['plain']:.3f} | {s['median']:.3f} | {s['p5']:.3f}-"
              f"{s['p95']:.3f} | {s['normal_between']} / {s['pneumonia_between']} | "
              f"{s['robust']:.3f} | {s['plain_bal_acc']:.4f} / {s['robust_bal_acc']:.4f} | "
              f"{s['robust_sens']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
