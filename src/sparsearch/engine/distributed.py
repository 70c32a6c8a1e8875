"""Data-parallel sparse training: the same masks on every process, by construction and checked.

``synchronize(sparsifier)`` (before ``attach``, after ``torch.distributed.init_process_group``) installs a
:class:`MaskSync` as the sparsifier's ``mask_sync``; the sparsifier calls it at two points:

- **initial masks** (``agree_initial_masks``, inside ``attach``, before the masks touch any weight): every rank
  computes its masks, then rank ``src``'s masks, seed and random-generator state are broadcast to all ranks. A
  random mask seeded differently per rank (the classic bug, sparseml #429), or a SNIP/GraSP score computed on
  each rank's own batch, therefore still gives one mask everywhere: rank ``src``'s. The algorithm and its
  settings must agree across ranks (checked; the seed is taken from rank ``src``).
- **after every optimizer step** (``after_step``): a checksum of every mask (kept count and a hash of its bits)
  is all-gathered, without waiting, and compared at the next step; a mismatch raises :class:`MaskMismatchError`
  naming the layers and the ranks. ``verify(sparsifier)`` checks at once (call it after the last step).

Mask *updates* need no communication: every input an update reads is identical on every rank under
``DistributedDataParallel``, and the top-k breaks ties by position (deterministic). Which algorithm reads what,
and when:

==================  =====================  =============================================================
algorithm           when                   reads
==================  =====================  =============================================================
RigL                before the step        |w| (drop) and the dense gradient |dL/dw| (grow)
SET                 before the step        w and its sign (drop), the sparsifier's generator (grow)
GMP, IMP            after the step         |w|
SR-STE, PGF         after the step         |w| of the dense weights (N:M top-k), every step
static methods      at ``attach`` only     weights, a batch (SNIP, GraSP) or nothing (random, SynFlow)
==================  =====================  =============================================================

DDP starts every rank from rank 0's parameters and all-reduces (averages) the gradients during the last
backward before a step, so at the optimizer's pre-step hook the gradients RigL reads are the global-batch
average and the weights are bitwise equal on every rank; the generator is equal since ``attach``. Under
``ddp.no_sync()`` gradient accumulation the sparsifier does nothing until the real ``optimizer.step()``,
which follows the synchronised backward: masks are updated on real optimizer steps only, from the gradient of
the whole accumulated batch. A ``step()`` taken inside ``no_sync`` reads per-rank gradients; RigL then
grows different weights per rank and the next check fails loudly.

Sharded data parallelism (FSDP) is refused: PyTorch 2.13 runs FSDP2 (``fully_shard``, parameters become
DTensors) and FSDP1 (flattened parameters) on the CPU with gloo, but the masks here are full-shape tensors
applied to full-shape parameters; on sharded or flattened parameters they would have no effect (sparseml
#1807) or fail deep inside PyTorch. ``refuse_sharded`` raises a clear error at ``attach`` instead, and the
per-step check raises if a masked parameter was replaced after ``attach`` (e.g. by ``fully_shard``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from sparsearch.engine.sparsifier import Sparsifier


class MaskMismatchError(RuntimeError):
    """Masks (or the step count) differ across the ranks of a data-parallel run."""


def refuse_sharded(model: nn.Module, params: Mapping[str, torch.Tensor]) -> None:
    """Raise if ``model`` is sharded by FSDP (FSDP1 or FSDP2) or any parameter to mask is a DTensor."""
    for module_name, module in model.named_modules():
        kind = type(module).__name__
        if kind == "FullyShardedDataParallel" or any(base.__name__ == "FSDPModule" for base in type(module).__mro__):
            where = f"module {module_name!r}" if module_name else "the model"
            raise TypeError(
                f"{where} is sharded by FSDP ({kind}); sparsearch masks full-shape parameters and does not "
                "support FSDP's sharded or flattened parameters (masks would have no effect): train with "
                "DistributedDataParallel"
            )
    for name, param in params.items():
        if type(param).__name__ in ("DTensor", "FlatParameter") or hasattr(param, "_local_tensor"):
            raise TypeError(
                f"parameter {name!r} is a {type(param).__name__} (sharded); sparsearch masks full-shape "
                "parameters only: train with DistributedDataParallel"
            )


def _collective_device(group: dist.ProcessGroup | None) -> torch.device:
    """NCCL exchanges CUDA tensors only; every other backend (gloo) exchanges CPU tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mask_checksum(mask: torch.Tensor) -> tuple[int, int]:
    """(kept count, 63-bit hash of the mask's bits): equal checksums mean equal masks, barring a hash collision."""
    bits = np.packbits(mask.detach().reshape(-1).cpu().numpy().astype(np.bool_))
    digest = hashlib.blake2b(bits.tobytes(), digest_size=8).digest()
    return int(mask.count_nonzero()), int.from_bytes(digest, "little") >> 1


class MaskSync:
    """Keeps a sparsifier's masks identical across the ranks of ``group`` (default: the whole world).

    Args:
        ddp: the DistributedDataParallel wrapper of the model the sparsifier attaches to (its ``.module``). DDP
            broadcasts rank 0's buffers before every forward pass, and the masks are buffers: that would cost a
            broadcast of every mask per step and silently overwrite (in place, keeping the version counter) a
            diverged mask instead of reporting it. Given the wrapper, the masks are left out of that broadcast.
        group: the process group of the data-parallel replicas (default: the wrapper's, else the whole world).
        src: global rank whose initial masks, seed and random state every rank takes.
        check_every: check mask checksums after every ``check_every``-th optimizer step (1: every step). One
            all-gather of 2 integers per layer, compared during the next checked step (it overlaps with the
            compute in between); ``verify()`` checks at once.
    """

    def __init__(
        self,
        ddp: nn.parallel.DistributedDataParallel | None = None,
        *,
        group: dist.ProcessGroup | None = None,
        src: int = 0,
        check_every: int = 1,
    ) -> None:
        if not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every must be a positive number of steps, got {check_every!r}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised: call torch.distributed.init_process_group (e.g. under "
                "torchrun) before synchronize()"
            )
        if not 0 <= src < dist.get_world_size():
            raise ValueError(f"src must be a global rank in [0, {dist.get_world_size()}), got {src}")
        if ddp is not None and not isinstance(ddp, nn.parallel.DistributedDataParallel):
            raise TypeError(f"ddp must be a DistributedDataParallel wrapper, got {type(ddp).__name__}")
        if group is None and ddp is not None:
            group = ddp.process_group
        self.ddp, self.group, self.src, self.check_every = ddp, group, src, check_every
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.steps_seen = 0
        # per parameter name: (the mask tensor hashed, its in-place version counter then, checksum)
        self._checksums: dict[str, tuple[torch.Tensor, int, tuple[int, int]]] = {}
        # the all-gather started after the last checked step: (work, result buffer, step, layer names)
        self._pending: tuple[dist.Work, torch.Tensor, int, list[str]] | None = None

    # ------------------------------------------------------------------------------ initial masks
    def agree_initial_masks(self, sparsifier: Sparsifier, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Called by ``attach``: check that every rank sparsifies the same way, then take rank ``src``'s masks,
        seed and generator state."""
        model = sparsifier.model
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError(
                "attach the sparsifier to the wrapped model (ddp_model.module), not to the "
                "DistributedDataParallel wrapper: parameter names then carry no 'module.' prefix, so masks and "
                "checkpoints are the same on any world size"
            )
        if self.ddp is not None and self.ddp.module is not model:
            raise ValueError("attach the sparsifier to the model wrapped by the given DDP wrapper (ddp.module)")
        description = {
            **{key: value for key, value in sparsifier.config().items() if key != "seed"},
            "parameters": {name: list(param.shape) for name, param in sparsifier.params.items()},
        }
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, json.loads(json.dumps(description, default=str)), group=self.group)
        differences = [
            f"rank {rank} has {key}={other.get(key)!r} where rank 0 has {gathered[0].get(key)!r}"
            for rank, other in enumerate(gathered)
            for key in sorted(set(other) | set(gathered[0]))
            if other.get(key) != gathered[0].get(key)
        ]
        if differences:
            raise ValueError(
                "the ranks configure the sparsifier differently: "
                + "; ".join(differences)
                + ". Every rank must build the same algorithm with the same settings on the same model"
            )
        device = _collective_device(self.group)
        names = list(masks)
        flat = torch.cat([masks[name].detach().reshape(-1).to(device=device, dtype=torch.uint8) for name in names])
        dist.broadcast(flat, src=self.src, group=self.group)
        agreed, start = {}, 0
        for name in names:
            mask = masks[name]
            agreed[name] = flat[start : start + mask.numel()].view(mask.shape).to(device=mask.device, dtype=torch.bool)
            start += mask.numel()
        random_state = [sparsifier.seed, sparsifier.generator.get_state()]
        dist.broadcast_object_list(random_state, src=self.src, group=self.group)
        sparsifier.seed = random_state[0]
        sparsifier.generator.set_state(random_state[1])
        return agreed

    # --------------------------------------------------------------------------------- checking
    def after_step(self, sparsifier: Sparsifier) -> None:
        """Called by the sparsifier after every optimizer step (every rank takes the same number of steps).

        Compares the previous check's checksums and starts this step's all-gather without waiting for it: its
        latency overlaps with the next step's forward and backward pass."""
        self.steps_seen += 1
        if self.steps_seen == 1 and self.ddp is not None:
            masks = {id(mask) for mask in sparsifier.masks.values()}
            names = {name for name, buffer in self.ddp.module.named_buffers() if id(buffer) in masks}
            self.ddp.parameters_to_ignore.update(names)  # read by DDP whenever it gathers buffers to broadcast
        if self.steps_seen % self.check_every == 0:
            self._compare_pending()
            self._start_check(sparsifier)

    def verify(self, sparsifier: Sparsifier) -> None:
        """Compare every mask's checksum and the step count across ranks now, and the check still in flight
        (a collective: call it on every rank, e.g. after the last step).

        Raises MaskMismatchError naming the layers whose masks differ and which ranks hold which mask.
        """
        self._compare_pending()
        self._start_check(sparsifier)
        self._compare_pending()

    def _checksum(self, name: str, mask: torch.Tensor) -> tuple[int, int]:
        # re-hash only masks replaced or modified in place since the last check (most steps change none)
        cached = self._checksums.get(name)
        if cached is None or cached[0] is not mask or cached[1] != mask._version:
            cached = (mask, mask._version, mask_checksum(mask))
            self._checksums[name] = cached
        return cached[2]

    def _start_check(self, sparsifier: Sparsifier) -> None:
        for name, (module, leaf) in sparsifier._owners.items():
            if getattr(module, leaf) is not sparsifier.params[name]:
                raise RuntimeError(
                    f"parameter {name!r} was replaced after the sparsifier was attached (sharded by FSDP, or "
                    "re-assigned); its mask no longer applies to it. Attach after wrapping, with DDP"
                )
        masks = sparsifier.masks
        names = list(masks)
        local = [sparsifier.step]
        for name in names:
            local.extend(self._checksum(name, masks[name]))
        device = _collective_device(self.group)
        mine = torch.tensor(local, dtype=torch.int64, device=device)
        everyone = torch.empty(self.world_size * mine.numel(), dtype=torch.int64, device=device)
        with self._reaching_peers(sparsifier.step):
            work = dist.all_gather_into_tensor(everyone, mine, group=self.group, async_op=True)
        self._pending = (work, everyone, sparsifier.step, names)

    def _compare_pending(self) -> None:
        if self._pending is None:
            return
        work, everyone, step, names = self._pending
        self._pending = None
        with self._reaching_peers(step):
            work.wait()
        table = everyone.view(self.world_size, -1).tolist()
        problems = []
        steps = [row[0] for row in table]
        if len(set(steps)) > 1:
            problems.append(f"optimizer step counts differ: {_by_value(steps)}")
        for index, name in enumerate(names):
            checksums = [(row[1 + 2 * index], row[2 + 2 * index]) for row in table]
            if len(set(checksums)) > 1:
                described = [f"{count} kept (hash {digest:016x})" for count, digest in checksums]
                problems.append(f"layer {name!r}: {_by_value(described)}")
        if problems:
            raise MaskMismatchError(
                f"masks differ across ranks after optimizer step {step} ("
                + "; ".join(problems)
                + "). Every rank must take the same optimizer steps on DDP-synchronised gradients and change "
                "masks only through the sparsifier"
            )

    @contextmanager
    def _reaching_peers(self, step: int) -> Iterator[None]:
        try:
            yield
        except Exception as error:  # a dead peer surfaces as one of several backend error types
            raise RuntimeError(
                f"rank {self.rank}: the mask check after optimizer step {step} could not reach the other ranks "
                f"(did one of them die or stop training?): {error}"
            ) from error


def _by_value(values: list[Any]) -> str:
    """'ranks 0, 2: X; rank 1: Y' for a list indexed by rank."""
    groups: dict[str, list[int]] = {}
    for rank, value in enumerate(values):
        groups.setdefault(str(value), []).append(rank)
    parts = []
    for value, ranks in groups.items():
        label = "rank" if len(ranks) == 1 else "ranks"
        parts.append(f"{label} {', '.join(map(str, ranks))}: {value}")
    return "; ".join(parts)


def synchronize(
    sparsifier: Sparsifier,
    ddp: nn.parallel.DistributedDataParallel | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    src: int = 0,
    check_every: int = 1,
) -> Sparsifier:
    """Make ``sparsifier`` keep identical masks on every rank; call on every rank, before ``attach``.

    Pass the DDP wrapper as ``ddp`` and attach to ``ddp.module``; see :class:`MaskSync` for the arguments.
    Returns the sparsifier, so that ``synchronize(RigL(...), ddp).attach(ddp.module, optimizer)`` chains.
    """
    if sparsifier.model is not None:
        raise RuntimeError(
            "synchronize() the sparsifier before attach(): the initial masks must be agreed before they touch "
            "the weights"
        )
    sparsifier.mask_sync = MaskSync(ddp, group=group, src=src, check_every=check_every)
    return sparsifier


def verify(sparsifier: Sparsifier) -> None:
    """Check now that every rank holds the same masks (a collective: call it on every rank, e.g. after the last
    step, whose check would otherwise be compared only at the next one). Raises MaskMismatchError on a mismatch."""
    if sparsifier.mask_sync is None:
        raise RuntimeError("this sparsifier is not synchronized: call synchronize(sparsifier, ddp) before attach()")
    sparsifier.mask_sync.verify(sparsifier)
