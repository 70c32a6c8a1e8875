"""The same sparse-training recipe through sparsearch, sparselab and rigl-torch: static mask, SET and RigL.

Recipe (identical for every library): Fashion-MNIST (the first --train-subset training images, the full
10,000-image test set), MLP 784-300-100-10 with ReLU, 90% sparsity uniform on the two hidden layers (the
784x300 and 300x100 weights; the 100x10 output layer and all biases dense), SGD momentum 0.9 at a constant
learning rate, batch 100, the same epochs, the same seeds (seed s: torch.manual_seed(s) before the model is
built, and the same minibatch order). Dynamic methods: update every --update-every steps, drop fraction 0.3;
RigL stops updating at 75% of training with the drop fraction decayed by a cosine (sparsearch, rigl-torch);
sparselab has neither option (constant 0.3, updates to the end).

Each library keeps its own choices where the recipe does not fix them, and those are what the comparison is
about: initialisation of the sparse layers (sparselab draws live weights with the Kaiming bound of the live
fan-in, 1/sqrt(0.1 * fan_in); sparsearch and rigl-torch keep PyTorch's dense init and zero 90% of it),
whether RigL skips the optimizer step on update steps (sparsearch, rigl-torch) and how grown weights start.
The "sparsearch ..." rows after the three libraries change one thing at a time, to find which one explains
a gap (ablations); "before the fix" seeds the mask's random stream as the engine did before issue 10 (with the
seed that also initialised the model, so the "random" mask of the first layer kept its largest positive
weights).

Adaptations, all recorded here: rigl-torch 0.5.2 imports torchvision only for two isinstance checks against
ResNet blocks, so a stand-in module with those two classes is put in sys.modules (torchvision is not installed:
it would pull another torch); its "uniform" distribution always keeps the first layer dense, so it is handed
a view of the model whose first layer is a dummy (not trained) and whose next two are the hidden layers;
``ignore_linear_layers=False`` so Linear layers are sparsified; static = ``static_topo=True``. rigl-torch has no
SET.

Results are appended to benchmarks/results/peer_accuracy.json as runs finish (re-running skips finished runs)
and rendered to benchmarks/results/peer_accuracy.md.

    python benchmarks/peer_accuracy.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import sparsearch as sa
from sparsearch.data import load_dataset

RESULTS = Path(__file__).parent / "results"
SPARSITY = 0.9
DROP_FRACTION = 0.3
HIDDEN = r"^(0|2)\.weight$"  # the two hidden layers of nn.Sequential(Linear, ReLU, Linear, ReLU, Linear)

# (library, method) rows in table order; the "sparsearch, ..." variants are the ablations
VARIANTS: dict[str, str] = {
    "dense/dense": "dense (same MLP, no mask)",
    "sparsearch/static": "sparsearch (defaults)",
    "sparselab/static": "sparselab 0.2.2",
    "rigl-torch/static": "rigl-torch 0.5.2",
    "sparsearch/set": "sparsearch (defaults)",
    "sparselab/set": "sparselab 0.2.2",
    "sparsearch/rigl": "sparsearch (defaults)",
    "sparselab/rigl": "sparselab 0.2.2",
    "rigl-torch/rigl": "rigl-torch 0.5.2",
    "sparsearch-before/static": "sparsearch before the fix (mask drawn from the init's random stream)",
    "sparsearch-before/set": "sparsearch before the fix",
    "sparsearch-before/rigl": "sparsearch before the fix",
    "sparsearch-rescale/static": "sparsearch, init='rescale' (sparselab's sparsity-aware init)",
    "sparsearch-rescale/set": "sparsearch, init='rescale'",
    "sparsearch-rescale/rigl": "sparsearch, init='rescale'",
    "sparsearch-no-skip/rigl": "sparsearch, optimizer step not skipped on update steps",
    "sparsearch-constant-drop/rigl": "sparsearch, sparselab's schedule (drop 0.3 constant, to the end)",
}


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def install_torchvision_standin() -> None:
    """rigl-torch's util imports torchvision for isinstance checks against two ResNet block classes only."""
    if "torchvision" in sys.modules:
        return
    torchvision = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")
    resnet = types.ModuleType("torchvision.models.resnet")
    resnet.Bottleneck = type("Bottleneck", (), {})
    resnet.BasicBlock = type("BasicBlock", (), {})
    torchvision.models, models.resnet = models, resnet
    sys.modules.update({"torchvision": torchvision, "torchvision.models": models, "torchvision.models.resnet": resnet})


class Run:
    """One library's model plus what it needs around the optimizer step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.before_step: Callable[[], bool] = lambda: True  # False: skip this optimizer step (rigl-torch)
        self.after_step: Callable[[], None] = lambda: None
        self.sparsity: Callable[[], float] = lambda: 0.0


def hidden_sparsity(weights: list[torch.Tensor]) -> float:
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def build(variant: str, seed: int, total_steps: int, args: argparse.Namespace) -> Run:
    library, method = variant.split("/")
    torch.manual_seed(seed)
    if library == "sparselab":
        import sparselab

        model = nn.Sequential(
            sparselab.SparseLinear(784, 300, sparsity=SPARSITY),
            nn.ReLU(),
            sparselab.SparseLinear(300, 100, sparsity=SPARSITY),
            nn.ReLU(),
            nn.Linear(100, 10),
        )
        run = Run(model, torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9))
        algorithm = {
            "static": lambda: sparselab.Static(sparsity=SPARSITY),
            "set": lambda: sparselab.SET(SPARSITY, DROP_FRACTION, args.update_every, seed=seed),
            "rigl": lambda: sparselab.RigL(SPARSITY, DROP_FRACTION, args.update_every, seed=seed),
        }[method]()
        model.apply(algorithm)
        run.after_step = algorithm.step
        run.sparsity = lambda: 1.0 - sum(model[i].nnz for i in (0, 2)) / (784 * 300 + 300 * 100)
        return run
    model = mlp()
    run = Run(model, torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9))
    hidden = [model[0].weight, model[2].weight]
    run.sparsity = lambda: hidden_sparsity(hidden)
    if library == "dense":
        return run
    if library == "rigl-torch":
        install_torchvision_standin()
        from rigl_torch.RigL import RigLScheduler

        view = nn.ModuleList([nn.Linear(1, 1), model[0], model[2]])  # first layer of the view: kept dense
        scheduler = RigLScheduler(
            view,
            run.optimizer,
            dense_allocation=1 - SPARSITY,
            T_end=int(0.75 * total_steps),
            sparsity_distribution="uniform",
            ignore_linear_layers=False,
            delta=args.update_every,
            alpha=DROP_FRACTION,
            static_topo=method == "static",
        )
        run.before_step = scheduler
        return run
    init = "rescale" if library == "sparsearch-rescale" else "dense"
    common = {"distribution": "uniform", "include": HIDDEN, "seed": seed, "init": init}
    if method == "static":
        sparsifier: sa.Sparsifier = sa.StaticRandom(SPARSITY, **common)
    elif method == "set":
        sparsifier = sa.SET(SPARSITY, update_every=args.update_every, drop_fraction=DROP_FRACTION, **common)
    else:
        schedule: dict = {"stop": 0.75, "total_steps": total_steps}
        if library == "sparsearch-constant-drop":
            schedule = {"stop": None, "drop_decay": "constant"}
        sparsifier = sa.RigL(
            SPARSITY, update_every=args.update_every, drop_fraction=DROP_FRACTION, **schedule, **common
        )
        if library == "sparsearch-no-skip":
            sparsifier.skip_update_step = False
    if library == "sparsearch-before":
        sparsifier.generator = torch.Generator().manual_seed(seed)  # what the engine did before the fix
    sparsifier.attach(model, run.optimizer)
    return run


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum()) for i in range(0, len(y), 1000))
    model.train()
    return correct / len(y)


def train(variant: str, seed: int, data, args: argparse.Namespace) -> dict:
    x_train = data.x_train[: args.train_subset].flatten(1)
    y_train = data.y_train[: args.train_subset]
    steps_per_epoch = len(y_train) // args.batch_size
    total_steps = steps_per_epoch * args.epochs
    run = build(variant, seed, total_steps, args)
    order_generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for _ in range(args.epochs):
        order = torch.randperm(len(y_train), generator=order_generator)
        for step in range(steps_per_epoch):
            rows = order[step * args.batch_size : (step + 1) * args.batch_size]
            run.optimizer.zero_grad()
            F.cross_entropy(run.model(x_train[rows]), y_train[rows]).backward()
            if run.before_step():
                run.optimizer.step()
            run.after_step()
    return {
        "variant": variant,
        "seed": seed,
        "test_accuracy": accuracy(run.model, data.x_test.flatten(1), data.y_test),
        "hidden_sparsity": run.sparsity(),
        "seconds": time.perf_counter() - started,
    }


def render(state: dict) -> str:
    meta = state["meta"]
    lines = [
        "# The same recipe through sparsearch, sparselab and rigl-torch",
        "",
        f"Machine: {meta['machine']}; {meta['date']}; torch {meta['torch']}; load average at the start "
        f"{meta['load_average']}; {meta['threads']} torch threads.",
        f"Recipe: Fashion-MNIST, first {meta['train_subset']} training images, {meta['epochs']} epochs, batch "
        f"{meta['batch_size']}, SGD momentum 0.9 lr {meta['lr']} (constant), MLP 784-300-100-10, 90% uniform on "
        f"the hidden layers, updates every {meta['update_every']} steps, drop fraction {DROP_FRACTION}.",
        "",
        "Test accuracy % (full test set), mean ± std over seeds (n), and the measured hidden-layer sparsity.",
        "",
        "| method | library | accuracy | n | hidden sparsity |",
        "|---|---|---|---|---|",
    ]
    for variant, label in VARIANTS.items():
        hits = [r for r in state["records"] if r["variant"] == variant]
        if not hits:
            continue
        acc = [100 * r["test_accuracy"] for r in hits]
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        method = variant.split("/")[1]
        sparsity = statistics.mean(r["hidden_sparsity"] for r in hits)
        lines.append(f"| {method} | {label} | {statistics.mean(acc):.2f} ± {std:.2f} | {len(acc)} | {sparsity:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-subset", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--update-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=RESULTS / "peer_accuracy")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    json_path = args.output.with_suffix(".json")
    budget = {
        "epochs": args.epochs,
        "train_subset": args.train_subset,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "update_every": args.update_every,
    }
    state = json.loads(json_path.read_text()) if json_path.exists() else {"records": []}
    if state["records"] and {k: state["meta"][k] for k in budget} != budget:
        raise SystemExit(f"{json_path} holds runs of another recipe; pass --output for a new file or delete it")
    state["meta"] = {
        **budget,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "threads": args.threads,
    }
    data = load_dataset("fashion-mnist", seed=0)
    done = {(r["variant"], r["seed"]) for r in state["records"]}
    for variant in args.variants:
        for seed in args.seeds:
            if (variant, seed) in done:
                continue
            record = train(variant, seed, data, args)
            state["records"].append(record)
            print(f"{variant:32s} seed {seed}: {100 * record['test_accuracy']:.2f}% ({record['seconds']:.0f} s)")
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(state, indent=1))
    args.output.with_suffix(".md").write_text(render(state))
    print(render(state))


if __name__ == "__main__":
    main()
