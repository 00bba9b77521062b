"""Would an ensemble help? Validation ROC-AUC and loss of averaged member probabilities.

    python benchmarks/val_ensemble.py runs/quick runs/exp-quick-lite2 [...]

Every member must have been trained on the same split (same data and seed): the
validation films are read from the first run's `split.csv`. Only validation images are
scored; the test split is never read.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score

from cxrkit.data.split import read_manifest
from cxrkit.inference import predict_logits
from cxrkit.labels import positive_index
from cxrkit.runs import load_model, softmax


def validation_probabilities(run: Path, paths: list[str]) -> np.ndarray:
    model = load_model(run)
    logits, _ = predict_logits(model, paths, batch_size=64)
    return softmax(logits)[:, positive_index(model.spec.labels, model.spec.positive_label)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    manifests = [[(Path(s.path).resolve(), s.split) for s in read_manifest(r / "split.csv")]
                 for r in args.runs]
    if any(m != manifests[0] for m in manifests):
        raise SystemExit("the runs were trained on different splits: their validation differs")
    val = [s for s in read_manifest(args.runs[0] / "split.csv") if s.split == "val"]
    y = np.array([s.label == "PNEUMONIA" for s in val])
    # The training criterion's class weights (balanced on the train split), as in val_loss.
    train_positive = np.mean([s.label == "PNEUMONIA" for s in read_manifest(
        args.runs[0] / "split.csv") if s.split == "train"])
    weights = np.where(y, 0.5 / train_positive, 0.5 / (1 - train_positive))
    members = [validation_probabilities(r, [s.path for s in val]) for r in args.runs]
    for name, p in [*zip([r.name for r in args.runs], members, strict=True),
                    ("ensemble (mean probability)", np.mean(members, axis=0))]:
        print(f"{name}: val ROC-AUC {roc_auc_score(y, p):.4f}, loss {log_loss(y, p):.4f}, "
              f"class-weighted loss {log_loss(y, p, sample_weight=weights):.4f}")


if __name__ == "__main__":
    main()
