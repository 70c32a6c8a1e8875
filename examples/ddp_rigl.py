"""Train RigL with DistributedDataParallel on several processes (gloo, CPU):

    torchrun --standalone --nproc-per-node 2 examples/ddp_rigl.py --epochs 20 --out rigl-ddp.safetensors

Each rank trains on its own shard of the 8x8 digits (DistributedSampler) with ``--accumulate`` micro-batches per
optimizer step (all but the last under ``ddp.no_sync()``). ``synchronize`` makes every rank take rank 0's initial
masks and checks after every step that the masks agree; rank 0 writes the checkpoint, which loads on any world
size (``sparsearch.load`` into the plain model).
"""

from __future__ import annotations

import argparse
import contextlib
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import sparsearch as sa
from sparsearch.data import load_dataset
from sparsearch.engine.distributed import synchronize, verify


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16, help="per rank and micro-batch")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--out", default="rigl-ddp.safetensors")
    args = parser.parse_args()

    # a short timeout: if a rank dies, the others fail within a minute instead of waiting 30 minutes
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    data = load_dataset("digits", seed=0)
    train = TensorDataset(data.x_train, data.y_train)
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    steps_per_epoch = len(loader) // args.accumulate

    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    )
    # wrap first, then attach to the wrapped model: parameter names and checkpoints do not depend on the world size
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    rigl = sa.RigL(args.sparsity, update_every=20, total_steps=args.epochs * steps_per_epoch)
    sparsifier = synchronize(rigl, ddp).attach(model, optimizer)

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        batches = iter(loader)
        for _ in range(steps_per_epoch):
            for micro in range(args.accumulate):
                x, y = next(batches)
                last = micro == args.accumulate - 1
                # gradients are all-reduced only in the last backward; the optimizer (and the masks) step once
                with contextlib.nullcontext() if last else ddp.no_sync():
                    (F.cross_entropy(ddp(x), y) / args.accumulate).backward()
            optimizer.step()
            optimizer.zero_grad()
        with torch.no_grad():
            accuracy = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
        if rank == 0:
            print(f"epoch {epoch + 1}: test accuracy {accuracy:.3f}, sparsity {sparsifier.overall_sparsity():.3f}")

    verify(sparsifier)  # raises if any rank's masks differ
    if rank == 0:
        print(f"masks identical on {world} ranks after {sparsifier.step} steps and {sparsifier.updates} RigL updates")
        sa.save(model, args.out, sparsifier=sparsifier)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
