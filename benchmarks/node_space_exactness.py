"""How close the node space lands to the target weight sparsity on models that are not the package's own.

Whole units make the achieved weight sparsity a step function of the common keep fraction; residual
connections make it coarser still (every channel of a residual stream is one unit shared by several convs).
For two ResNets (CIFAR-style ResNet-20: 16/32/64 channels, 3 blocks a stage; a ResNet-18-width net: 64 to
512 channels, 2 blocks a stage; both with BatchNorm, 1x1 projection shortcuts, 1x28x28 input) and, for
comparison, the package's default MLP and CNN (MNIST-1D shapes), it reports at every target sparsity: the
achieved weight sparsity, its error, the node sparsity, the number of removable unit groups, and the time to
analyse the model and solve the keep fraction. It also checks that a sample's masks have exactly the
sparsity the space promises and that the masked ResNet's output equals the output of the same masked ResNet
with every removed unit's BatchNorm scale and shift and producer bias perturbed (they contribute nothing).

    python benchmarks/node_space_exactness.py
"""

from __future__ import annotations

import json
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsearch.models import build_model
from sparsearch.search import NodeSpace, node_sparsity, weight_sparsity

RESULTS = Path(__file__).parent / "results"
SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, widths: tuple[int, ...], blocks: int, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]))
        layers, c_in = [], widths[0]
        for stage, width in enumerate(widths):
            for index in range(blocks):
                layers.append(Block(c_in, width, 2 if stage > 0 and index == 0 else 1))
                c_in = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(F.relu(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def models() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    return {
        "ResNet-20 (16/32/64, 3 blocks a stage)": (ResNet((16, 32, 64), 3), (1, 28, 28)),
        "ResNet-18 widths (64/128/256/512, 2 blocks a stage)": (ResNet((64, 128, 256, 512), 2), (1, 28, 28)),
        "default MLP (40-512-512-256-10)": (build_model("mlp", (40,), 10, seed=0), (40,)),
        "default CNN (1-D, 32/64/64)": (build_model("cnn", (40,), 10, seed=0), (40,)),
    }


@torch.no_grad()
def removed_channels_contribute_nothing(model: nn.Module, space: NodeSpace, input_shape: tuple[int, ...]) -> bool:
    masks = space.sample(torch.Generator().manual_seed(0))
    model = model.eval()
    for name, parameter in model.named_parameters():
        if name in masks:
            parameter.mul_(masks[name])
    x = torch.randn(4, *input_shape)
    before = model(x)
    modules = dict(model.named_modules())
    perturbed = 0
    for group in space.groups:
        slot = group.producers[0]
        removed = ~masks[slot.parameter][slot.offset : slot.offset + group.units].reshape(group.units, -1).any(1)
        for norm in group.norms:
            modules[norm].weight[removed] += 3.0
            modules[norm].bias[removed] += 3.0
            perturbed += int(removed.sum())
        for producer in group.producers:
            bias = modules[producer.parameter.removesuffix(".weight")].bias
            if bias is not None:
                bias[producer.offset : producer.offset + group.units][removed] += 3.0
                perturbed += int(removed.sum())
    assert perturbed > 0
    return torch.equal(model(x), before)


def main() -> None:
    load = os.getloadavg()[0]
    rows = []
    for label, (model, input_shape) in models().items():
        for sparsity in SPARSITIES:
            start = time.perf_counter()
            space = NodeSpace(model, sparsity)
            seconds = time.perf_counter() - start
            masks = space.sample(torch.Generator().manual_seed(0))
            assert abs(weight_sparsity(masks) - space.achieved_sparsity) < 1e-12
            assert abs(node_sparsity(model, masks) - space.achieved_node_sparsity) < 1e-12
            rows.append(
                {
                    "model": label,
                    "weights": sum(m.numel() for m in masks.values()),
                    "groups": len(space.groups),
                    "units": sum(g.units for g in space.groups),
                    "layers_kept_whole": len(space.notes),
                    "target": sparsity,
                    "achieved": space.achieved_sparsity,
                    "error": space.achieved_sparsity - sparsity,
                    "node_sparsity": space.achieved_node_sparsity,
                    "analyse_and_solve_s": seconds,
                }
            )
            print(f"{label:52s} {sparsity:.2f} -> {space.achieved_sparsity:.4f} ({seconds:.2f} s)", flush=True)
        rows[-1]["removed_channels_contribute_nothing"] = removed_channels_contribute_nothing(
            model, NodeSpace(model, 0.7), input_shape
        )
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
        f"load average before the run {load:.2f} (shared machine: times are rough)",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "node_space_exactness.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# Node space: achieved vs target weight sparsity",
        "",
        f"{meta['machine']}; {meta['date']}; torch {meta['torch']}. `python benchmarks/node_space_exactness.py`",
        "",
        "| model | groups (units) | target | achieved | error | node sparsity | analyse + solve (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['groups']} ({row['units']}) | {row['target']:.2f} | {row['achieved']:.4f} "
            f"| {row['error']:+.4f} | {row['node_sparsity']:.3f} | {row['analyse_and_solve_s']:.2f} |"
        )
    lines.append("")
    for row in rows:
        if "removed_channels_contribute_nothing" in row:
            lines.append(
                f"- {row['model']}: {row['layers_kept_whole']} layer(s) kept whole; removed units contribute "
                f"nothing (their BatchNorm entries and biases perturbed, output bit-identical): "
                f"{row['removed_channels_contribute_nothing']}"
            )
    (RESULTS / "node_space_exactness.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
