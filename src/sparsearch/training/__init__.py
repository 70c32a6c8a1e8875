"""The one training loop, below both search (short-training scores) and study (every arm): budget, optimizer,
learning-rate schedule, deterministic batches, evaluation and training FLOPs."""

from sparsearch.training.loop import (
    EVAL_BATCH_SIZE,
    EpochMetrics,
    KernelSwitch,
    TrainBudget,
    TrainResult,
    batch_order,
    deterministic_algorithms,
    evaluate,
    kernel_layers,
    make_optimizer,
    make_scheduler,
    on_kernels,
    train,
)

__all__ = [
    "EVAL_BATCH_SIZE",
    "EpochMetrics",
    "KernelSwitch",
    "TrainBudget",
    "TrainResult",
    "batch_order",
    "deterministic_algorithms",
    "evaluate",
    "kernel_layers",
    "make_optimizer",
    "make_scheduler",
    "on_kernels",
    "train",
]
