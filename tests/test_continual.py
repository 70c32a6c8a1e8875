"""Continual learning: SparCL's masks protect earlier tasks' weights; replay, metrics and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsearch as sa
from sparsearch.algorithms.continual import ContinualResult, ReplayBuffer, Task, TaskAwareMasks, split_by_classes


def _blobs(n=240, classes=4, features=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, features, generator=generator) * 3
    y = torch.arange(n) % classes
    return centres[y] + torch.randn(n, features, generator=generator), y


def _tasks():
    x, y = _blobs()
    x_test, y_test = _blobs(seed=1)
    return split_by_classes(x, y, x_test, y_test, classes_per_task=2)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))


def test_masked_gradients_are_zero_on_other_tasks_weights_so_those_weights_never_change():
    model = _model()
    weights = {name: p for name, p in model.named_parameters() if name.endswith("weight")}
    masks = TaskAwareMasks(weights, sparsity=0.5, n_tasks=2, generator=torch.Generator().manual_seed(0))
    first, second = _tasks()
    for task, last in ((first, False), (second, True)):
        masks.start_task()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        frozen = {name: (masks.retained[name].clone(), p.detach().clone()) for name, p in weights.items()}
        for step in range(30):
            loss = F.cross_entropy(model(task.x_train), task.y_train)
            optimizer.zero_grad()
            loss.backward()
            if step == 10:
                masks.drop_and_grow(0.3, {n: p.grad.clone() for n, p in weights.items()}, optimizer)
            masks.mask_gradients()
            for name, p in weights.items():
                assert not p.grad[~masks.trainable[name]].any()  # zero outside the current task's weights
                assert not (masks.trainable[name] & masks.retained[name]).any()
            optimizer.step()
        for name, (retained, before) in frozen.items():
            assert torch.equal(weights[name].detach()[retained], before[retained]), name
            if task is second:
                assert retained.any()  # the first task did retain weights, and they stayed put
        masks.end_task(last=last)
    for name, p in weights.items():
        assert int((p != 0).sum()) <= masks.budget(name)
        assert abs(int(masks.retained[name].sum()) - masks.budget(name)) <= 1


def test_sparcl_ends_at_its_density_and_forgets_less_than_fine_tuning_on_separable_tasks():
    tasks = _tasks()
    finetune = sa.train_continual(_model(), tasks, "finetune", epochs=3, lr=0.05, seed=0)
    sparcl = sa.train_continual(_model(), tasks, "sparcl", epochs=3, lr=0.05, sparsity=0.5, update_every=5,
                                buffer_size=20, seed=0)
    assert sparcl.final_density == pytest.approx(0.5, abs=0.01)
    assert len(sparcl.accuracy) == 2 and [len(row) for row in sparcl.accuracy] == [1, 2]
    assert sparcl.forgetting < finetune.forgetting
    assert sparcl.train_flops < finetune.train_flops * 2  # replay doubles the batch; sparsity pays for it


def test_reservoir_buffer_keeps_its_size_and_holds_samples_of_every_task():
    buffer = ReplayBuffer(50, torch.Generator().manual_seed(0))
    buffer.add(torch.zeros(500, 3), torch.zeros(500, dtype=torch.long))
    buffer.add(torch.ones(500, 3), torch.ones(500, dtype=torch.long))
    assert buffer.filled == 50 and buffer.seen == 1000
    share = float(buffer.y[:50].float().mean())
    assert 0.3 < share < 0.7


def test_average_accuracy_and_forgetting_follow_their_definitions():
    result = ContinualResult("x", accuracy=[[0.9], [0.6, 0.8], [0.5, 0.7, 0.9]], task_accuracy=[[1.0]], train_flops=0)
    assert result.average_accuracy == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    assert result.forgetting == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)


def test_bad_settings_are_refused_before_training():
    tasks = _tasks()
    empty = Task(tasks[0].x_train[:0], tasks[0].y_train[:0], tasks[0].x_test, tasks[0].y_test, (0, 1))
    with pytest.raises(ValueError, match=r"task 1 \(classes \(0, 1\)\) is empty: it has 0 training"):
        sa.train_continual(_model(), [tasks[0], empty], "replay")
    with pytest.raises(ValueError, match="unknown continual method 'gem'; allowed: finetune, replay, ewc, sparcl"):
        sa.train_continual(_model(), tasks, "gem")
    with pytest.raises(ValueError, match="no tasks given"):
        sa.train_continual(_model(), [], "finetune")
    with pytest.raises(ValueError, match="4 classes cannot be split into tasks of 3"):
        split_by_classes(*_blobs(), *_blobs(seed=1), classes_per_task=3)
