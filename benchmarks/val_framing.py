"""Does a model read how tightly a film is framed? Validation films, zoomed in, rescored.

    python benchmarks/val_framing.py runs/quick runs/exp-quick-views [...] [--crops 0.85 0.7]

Each validation film of the runs' split is centre-cropped to a fraction of its width and
height and resized back to its own size: the same chest, framed more tightly, as another
site's radiographers might frame it. A model that reads the chest scores these as it scores
the originals; one that learned "tight framing means pneumonia" (PNEUMONIA films in
Kermany's train split are framed more tightly than NORMAL ones) loses specificity. The
threshold is each run's Youden's J on the plain validation films, as `cxr evaluate` chooses
it. Only validation images are read; the test split never is.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

from cxrkit.data.split import read_manifest
from cxrkit.evaluation.thresholds import youden_threshold
from cxrkit.inference import predict_logits, softmax
from cxrkit.runs import load_model, positive_index


def centre_crops(paths: list[str], fraction: float, folder: Path) -> list[str]:
    """Each image centre-cropped to `fraction` of its sides, resized back, saved losslessly."""
    out = []
    for i, path in enumerate(paths):
        image = Image.open(path)
        w, h = image.size
        cw, ch = round(w * fraction), round(h * fraction)
        left, top = (w - cw) // 2, (h - ch) // 2
        crop = image.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.BICUBIC)
        out.append(str(folder / f"{i}.png"))
        crop.save(out[-1])
    return out


def pneumonia_probability(model, paths: list[str]) -> np.ndarray:
    logits, _ = predict_logits(model, paths, batch_size=64)
    return softmax(logits)[:, positive_index(model.spec.labels)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--crops", nargs="+", type=float, default=[0.85, 0.7])
    args = parser.parse_args()
    manifests = [[(Path(s.path).resolve(), s.split) for s in read_manifest(r / "split.csv")]
                 for r in args.runs]
    if any(m != manifests[0] for m in manifests):
        raise SystemExit("the runs were trained on different splits: their validation differs")
    val = [s for s in read_manifest(args.runs[0] / "split.csv") if s.split == "val"]
    y = np.array([s.label == "PNEUMONIA" for s in val])
    with tempfile.TemporaryDirectory() as tmp:
        views = {1.0: [s.path for s in val]}
        for fraction in args.crops:
            (Path(tmp) / str(fraction)).mkdir()
            views[fraction] = centre_crops(views[1.0], fraction, Path(tmp) / str(fraction))
        print("run | crop | val ROC-AUC | sensitivity | specificity | balanced accuracy")
        for run in args.runs:
            model = load_model(run)
            probs = {fraction: pneumonia_probability(model, paths)
                     for fraction, paths in views.items()}
            threshold = youden_threshold(y, probs[1.0])
            stressed = []
            for fraction, p in probs.items():
                sens, spec = np.mean(p[y] >= threshold), np.mean(p[~y] < threshold)
                if fraction != 1.0:
                    stressed.append((sens + spec) / 2)
                print(f"{run.name} | {fraction:.2f} | {roc_auc_score(y, p):.4f} | {sens:.3f} | "
                      f"{spec:.3f} | {(sens + spec) / 2:.3f}", flush=True)
            print(f"{run.name}: threshold {threshold:.3f}, mean balanced accuracy over the crops "
                  f"{np.mean(stressed):.3f}", flush=True)


if __name__ == "__main__":
    main()
