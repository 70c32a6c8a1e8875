"""One-shot pruning of pretrained transformers: magnitude, Wanda, SparseGPT, DSnoT on top of any of them, and
OWL's outlier-weighted per-block sparsity for any of them.

Calibration text goes through the model block by block (each block sees the outputs of already-pruned
blocks); no gradients, no retraining. ``prune_pretrained`` works on a Hugging Face model directory and writes
a pruned copy; ``prune_model`` prunes a loaded model in place.
"""

from __future__ import annotations

import importlib
from typing import Any

# Names are imported on first use (PEP 562): `transformers` takes seconds to import, and the `sparsearch`
# command line imports this package for every command, not only for `prune`.
_EXPORTS = {
    "calibration_windows": "calibration",
    "read_calibration_file": "calibration",
    "OneShotConfig": "config",
    "parse_pattern": "config",
    "load_pretrained": "hf",
    "prune_pretrained": "hf",
    "InputStatistics": "methods",
    "prune_weight": "methods",
    "relative_reconstruction_error": "methods",
    "outlier_ratio": "owl",
    "owl_sparsities": "owl",
    "LayerReport": "report",
    "PruneReport": "report",
    "find_blocks": "sequential",
    "prune_model": "sequential",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sparsearch.oneshot' has no attribute {name!r}")
    return getattr(importlib.import_module(f"sparsearch.oneshot.{_EXPORTS[name]}"), name)
