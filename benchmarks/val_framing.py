"""Does a model read how tightly a film is framed? The framing check, on validation only.

    python benchmarks/val_framing.py runs/quick runs/exp-quick-views [...]

For each run: `cxr evaluate RUN --split val --framing` (the validation films as filmed, then
centre-cropped to 85% and 70% of their sides before resizing, at the run's own
validation threshold), then one table row per run. A model that reads the chest scores the
cropped films as it scores the originals; one that learned "tight framing means pneumonia"
(PNEUMONIA films in Kermany's train split are framed more tightly than NORMAL ones) loses
specificity. The test split is never read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cxrkit.evaluation import evaluate_run


def cells(block: dict) -> list[str]:
    at = block["operating_points"]["validation"]
    return [f"{block['roc_auc']['value']:.4f}",
            *(f"{at[k]['value']:.3f}" for k in ("sensitivity", "specificity",
                                                 "balanced_accuracy"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    print("| run | as filmed: ROC-AUC / sens. / spec. / balanced acc. | 85% crop: same | "
          "70% crop: same |")
    print("|---|---|---|---|")
    for run in args.runs:
        out = evaluate_run(run, split="val", framing=True, figures=False, bootstrap=0)
        metrics = json.loads((out / "metrics.json").read_text())
        blocks = [metrics, *(metrics["framing"][c] for c in metrics["framing"]["crops"])]
        print(f"| `{run.name}` | " + " | ".join(" / ".join(cells(b)) for b in blocks) + " |",
              flush=True)


if __name__ == "__main__":
    main()
