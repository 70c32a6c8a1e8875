"""One-shot pruning of pretrained transformers: magnitude, Wanda, SparseGPT, and DSnoT on top of any of them.

Calibration text goes through the model block by block (each block sees the outputs of already-pruned
blocks); no gradients, no retraining. ``prune_pretrained`` works on a Hugging Face model directory and writes
a pruned copy; ``prune_model`` prunes a loaded model in place.
"""

from sparsearch.oneshot.calibration import calibration_windows, read_calibration_file
from sparsearch.oneshot.config import OneShotConfig, parse_pattern
from sparsearch.oneshot.hf import load_pretrained, prune_pretrained
from sparsearch.oneshot.methods import InputStatistics, prune_weight, relative_reconstruction_error
from sparsearch.oneshot.report import LayerReport, PruneReport
from sparsearch.oneshot.sequential import find_blocks, prune_model

__all__ = [
    "InputStatistics",
    "LayerReport",
    "OneShotConfig",
    "PruneReport",
    "calibration_windows",
    "find_blocks",
    "load_pretrained",
    "parse_pattern",
    "prune_model",
    "prune_pretrained",
    "prune_weight",
    "read_calibration_file",
    "relative_reconstruction_error",
]
