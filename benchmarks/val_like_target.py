"""A validation split that looks like a new site: adversarial validation, label-free.

    python benchmarks/val_like_target.py ../shared/data/chest_xray --out like.csv
    cxr train --data like.csv --preset quick --set data.val_fraction=0 --name like

Frozen ImageNet EfficientNet-Lite0 features of the training films and of the target
films (by default the dataset's own test split, whose *labels are never read*); a
logistic regression tells the two apart, and its cross-validated score ranks every
training film by how much it looks like the target. Each class's most target-like
patients (by their films' mean score) go to validation until it holds `--val-fraction`
of the class's films, so threshold and temperature are chosen on films that resemble the
target. The target films stay where they are in the manifest. Transductive: it sees the
target's images, so results belong in their own row (BENCHMARKS.md, twelfth round).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cxrkit.data.layout import load_source
from cxrkit.data.split import patient_split, write_manifest
from cxrkit.inference import file_batches
from cxrkit.models import create_model


def imagenet_features(paths: list[str], batch_size: int = 64) -> np.ndarray:
    model = create_model("efficientnet_lite0").eval().to(memory_format=torch.channels_last)
    features = np.zeros((len(paths), model.backbone.num_features), np.float32)
    with torch.no_grad():
        for x, index, *_ in file_batches(model.spec, paths, batch_size, num_workers=1):
            if x is not None:
                features[index] = model.backbone(
                    x.contiguous(memory_format=torch.channels_last)).numpy()
    return features


def target_likeness(train: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, float]:
    """Each training film's cross-validated P(target); and the domain ROC-AUC."""
    x, is_target = np.concatenate([train, target]), np.r_[np.zeros(len(train)),
                                                          np.ones(len(target))]
    classifier = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=2000))
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    score = cross_val_predict(classifier, x, is_target, cv=folds, method="predict_proba")[:, 1]
    return score[:len(train)], roc_auc_score(is_target, score)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--target-split", default="test")
    parser.add_argument("--val-fraction", type=float, default=0.15)
    args = parser.parse_args()
    samples = load_source(args.data.resolve()).samples  # absolute paths in the manifest
    train = [s for s in samples if s.split in ("train", "val")]
    target = [s for s in samples if s.split == args.target_split]
    features = imagenet_features([s.path for s in train + target])
    score, domain_auc = target_likeness(features[:len(train)], features[len(train):])
    print(f"domain classifier (train vs {args.target_split} films, label-free): "
          f"cross-validated ROC-AUC {domain_auc:.3f}")

    films_of: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(train):
        films_of[s.patient_id].append(i)
    rank = {patient: score[films].mean() for patient, films in films_of.items()}
    split = patient_split(train, args.val_fraction, rank=rank)
    val_patients = {s.patient_id for s in split if s.split == "val"}
    rest = [s for s in samples if s.split not in ("train", "val")]
    write_manifest(split + rest, args.out)
    val = [i for i, s in enumerate(split) if s.split == "val"]
    print(f"validation: {len(val)} films of {len(val_patients)} patients, mean target-likeness "
          f"{score[val].mean():.3f} (all training films {score.mean():.3f}); wrote {args.out}")


if __name__ == "__main__":
    main()
