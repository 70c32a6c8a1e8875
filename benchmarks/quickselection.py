"""QuickSelection against random features, mutual information and the Laplacian score: accuracy on the top k.

Each selector ranks the features of the training samples; an ExtraTrees classifier (50 trees, as in the
QuickSelection paper) is trained on the top-k features and scored on held-out samples. Selection time is
wall time on one torch thread (a shared machine: see the load average). Selectors:

- QuickSelection (``sparsearch.quickselection``; unsupervised; hidden 1000, epsilon 13, 10 epochs at lr 0.05);
- random features (mean over 5 draws);
- scikit-learn ``mutual_info_classif`` (supervised: it sees the labels);
- Laplacian score (He et al. 2005; unsupervised; 5-nearest-neighbour graph with heat-kernel weights), written
  here because scikit-learn has none: smaller score = feature varies smoothly over the data's neighbourhoods.

Data: Fashion-MNIST pixels (first 5,000 training / 2,000 test images), MNIST-5k (its own split), scikit-learn's
8x8 digits, and a scikit-learn ``make_classification`` set (500 features of which 10 informative and 10
redundant), where the recall of those 20 is reported as well.

    python benchmarks/quickselection.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.datasets import make_classification
from sklearn.ensemble import ExtraTreesClassifier
from sklearn.feature_selection import mutual_info_classif
from sklearn.neighbors import kneighbors_graph

import sparsearch as sa
from sparsearch.data import load_dataset

RESULTS = Path(__file__).parent / "results"
RANDOM_DRAWS = 5


def laplacian_score(x: np.ndarray, neighbours: int = 5) -> np.ndarray:
    """He, Cai & Niyogi (2005): f~' L f~ / f~' D f~ per feature on a k-NN heat-kernel graph (lower = better)."""
    x = x.astype(np.float64)
    graph = kneighbors_graph(x, neighbours, mode="distance", include_self=False)
    graph = graph.maximum(graph.T)
    squared = graph.copy()
    squared.data = squared.data**2
    t = squared.data.mean()
    weights = squared.copy()
    weights.data = np.exp(-squared.data / t)
    degree = np.asarray(weights.sum(1)).ravel()
    centred = x - (degree @ x) / degree.sum()
    d_term = (degree[:, None] * centred**2).sum(0)
    s_term = (centred * (weights @ centred)).sum(0)
    # constant features last: float32 rounding leaves them a tiny d_term and an arbitrary (often tiny) score
    constant = x.max(0) == x.min(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = (d_term - s_term) / d_term
    return np.where(constant | (d_term <= 0), np.inf, score)


def accuracy(x_train, y_train, x_test, y_test, features) -> float:
    classifier = ExtraTreesClassifier(n_estimators=50, random_state=0, n_jobs=1)
    classifier.fit(x_train[:, features], y_train)
    return float((classifier.predict(x_test[:, features]) == y_test).mean())


def datasets() -> dict:
    out = {}
    fashion = load_dataset("fashion-mnist", seed=0)
    out["fashion-mnist"] = (fashion.x_train[:5000].flatten(1).numpy(), fashion.y_train[:5000].numpy(),
                            fashion.x_test[:2000].flatten(1).numpy(), fashion.y_test[:2000].numpy(), 50, None)
    mnist = load_dataset("mnist5k", seed=0)
    x_train = torch.cat([mnist.x_train, mnist.x_val]).flatten(1).numpy()
    y_train = torch.cat([mnist.y_train, mnist.y_val]).numpy()
    out["mnist5k"] = (x_train, y_train, mnist.x_test.flatten(1).numpy(), mnist.y_test.numpy(), 50, None)
    digits = load_dataset("digits", seed=0)
    out["digits (scikit-learn)"] = (
        torch.cat([digits.x_train, digits.x_val]).flatten(1).numpy(), torch.cat([digits.y_train, digits.y_val]).numpy(),
        digits.x_test.flatten(1).numpy(), digits.y_test.numpy(), 16, None,
    )
    x, y = make_classification(n_samples=3000, n_features=500, n_informative=10, n_redundant=10, n_classes=4,
                               shuffle=False, random_state=0)  # unshuffled: the 20 useful features come first
    generator = np.random.default_rng(0)
    rows, permutation = generator.permutation(3000), generator.permutation(500)  # unshuffled rows are class-sorted
    x, y = x[rows][:, permutation].astype(np.float32), y[rows]
    useful = set(np.argsort(permutation)[:20].tolist())
    out["make_classification 500 features"] = (x[:2000], y[:2000], x[2000:], y[2000:], 20, useful)
    return out


def main() -> None:
    torch.set_num_threads(1)
    meta = {"machine": f"{platform.machine()} {platform.processor() or ''} ({os.cpu_count()} cores)".strip(),
            "torch": torch.__version__, "sklearn": sklearn.__version__,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "load_average_start": [round(v, 2) for v in os.getloadavg()]}
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redo", nargs="*", default=None,
                        help="keep the stored rows; recompute only these selectors or data sets (and the baselines)")
    args = parser.parse_args()
    stored = json.loads((RESULTS / "quickselection.json").read_text()) if args.redo is not None else None
    rows = []
    for name, (x_train, y_train, x_test, y_test, k, useful) in datasets().items():
        n_features = x_train.shape[1]
        selectors = {
            "QuickSelection": lambda x, y, k=k: sa.quickselection(torch.from_numpy(x), k, seed=0).ranking.numpy(),
            "mutual information (supervised)": lambda x, y: np.argsort(-mutual_info_classif(x, y, random_state=0),
                                                                         kind="stable"),
            "Laplacian score": lambda x, y: np.argsort(laplacian_score(x), kind="stable"),
        }
        rankings: dict[str, tuple[np.ndarray, float]] = {}
        for selector, rank in selectors.items():
            if stored is not None and selector not in args.redo and name not in args.redo:
                rows.extend(r for r in stored["rows"] if r["data"] == name and r["selector"] == selector)
                continue
            started = time.perf_counter()
            rankings[selector] = (rank(x_train, y_train), time.perf_counter() - started)
        for selector, (ranking, seconds) in rankings.items():
            top = ranking[:k]
            rows.append({"data": name, "features": n_features, "k": k, "selector": selector,
                         "accuracy": accuracy(x_train, y_train, x_test, y_test, top), "seconds": seconds,
                         "recall_of_useful": len(useful & set(top.tolist())) / len(useful) if useful else None})
            print(json.dumps(rows[-1]), flush=True)
        generator = np.random.default_rng(0)
        draws = [generator.choice(n_features, k, replace=False) for _ in range(RANDOM_DRAWS)]
        rows.append({"data": name, "features": n_features, "k": k, "selector": f"random (mean of {RANDOM_DRAWS})",
                     "accuracy": float(np.mean([accuracy(x_train, y_train, x_test, y_test, d) for d in draws])),
                     "seconds": 0.0,
                     "recall_of_useful": float(np.mean([len(useful & set(d.tolist())) / len(useful) for d in draws]))
                     if useful else None})
        rows.append({"data": name, "features": n_features, "k": n_features, "selector": "all features",
                     "accuracy": accuracy(x_train, y_train, x_test, y_test, np.arange(n_features)), "seconds": 0.0,
                     "recall_of_useful": None})
        print(json.dumps(rows[-2:]), flush=True)
    meta["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quickselection.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["# QuickSelection vs baselines: ExtraTrees accuracy on the top-k features", "",
             f"Machine: {meta['machine']}, torch {meta['torch']}, scikit-learn {meta['sklearn']}, 1 thread; "
             f"{meta['date']}; load average {meta['load_average_start']} at start, {meta['load_average_end']} at "
             "the end (shared machine: times are indicative). Produced by `python benchmarks/quickselection.py`.", "",
             "| data (features, k) | selector | test accuracy % | selection seconds | recall of the 20 useful |",
             "|---|---|---|---|---|"]
    for row in rows:
        recall = "" if row["recall_of_useful"] is None else f"{row['recall_of_useful']:.2f}"
        lines.append(f"| {row['data']} ({row['features']}, {row['k']}) | {row['selector']} | "
                     f"{100 * row['accuracy']:.2f} | {row['seconds']:.1f} | {recall} |")
    (RESULTS / "quickselection.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
