"""The independent axes: schedules, structures, scores."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsearch.sparsity.masks import topk_mask
from sparsearch.sparsity.schedules import Constant, Cosine, Cubic, Exponential, Linear, as_schedule
from sparsearch.sparsity.scores import compute_scores, grasp_scores, snip_scores, synflow_scores
from sparsearch.sparsity.structures import NM, Block, Channel, Unstructured, parse_structure


def test_cubic_schedule_matches_zhu_gupta_formula_and_staircase():
    schedule = Cubic(0.0, 0.9, begin_step=100, end_step=1100, every=100)
    for step in (100, 200, 500, 1000):
        assert schedule(step) == pytest.approx(0.9 + (0.0 - 0.9) * (1 - (step - 100) / 1000) ** 3)
    assert schedule(250) == schedule(200)  # only changes on pruning steps
    assert schedule(0) == 0.0 and schedule(1100) == 0.9 and schedule(5000) == 0.9


def test_cosine_linear_exponential_constant():
    cosine = Cosine(0.3, 0.0, 0, 1000)
    assert cosine(0) == pytest.approx(0.3) and cosine(500) == pytest.approx(0.15) and cosine(1000) == pytest.approx(0)
    assert cosine(250) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert Linear(1.0, 0.0, 10, 20)(15) == pytest.approx(0.5)
    assert Exponential(1.0, 0.01)(100) == pytest.approx(math.exp(-1))
    assert as_schedule(0.25)(123) == 0.25 and isinstance(as_schedule(0.25), Constant)


@pytest.mark.parametrize(
    "build", [lambda: Cosine(1, 0, 10, 10), lambda: Cubic(0, 1, -1, 5), lambda: Exponential(1, -0.1)]
)
def test_bad_schedule_windows_raise(build):
    with pytest.raises(ValueError):
        build()


def test_as_schedule_rejects_non_numbers():
    with pytest.raises(TypeError, match="number or a schedule"):
        as_schedule("0.5")


@pytest.mark.parametrize("shape", [(8, 16), (6, 8, 3, 3), (4, 12, 5)])
def test_nm_pattern_holds_in_every_group(shape):
    scores = torch.randn(shape)
    mask = NM(2, 4).mask(scores)
    grouped = mask.permute(0, *range(2, len(shape)), 1).reshape(-1, 4)
    assert (grouped.sum(dim=1) == 2).all()
    # the kept ones are the two largest of each group
    groups = scores.permute(0, *range(2, len(shape)), 1).reshape(-1, 4)
    assert torch.equal(grouped, torch.zeros_like(grouped).scatter_(1, groups.topk(2, dim=1).indices, True))


@pytest.mark.parametrize("n, m", [(4, 4), (5, 4), (0, 4), (1, 1)])
def test_nm_rejects_n_not_below_m(n, m):
    with pytest.raises(ValueError, match="1 <= N < M"):
        NM(n, m)


def test_nm_rejects_input_dimension_not_divisible():
    with pytest.raises(ValueError, match=r"input dimension .*divisible by M=4.*\(8, 6\)"):
        NM(2, 4).check("fc.weight", (8, 6))


def test_block_and_channel_keep_whole_units():
    scores = torch.rand(8, 8)
    mask = Block(2, 4).mask(scores, keep=16)
    assert int(mask.sum()) == 16
    blocks = mask.reshape(4, 2, 2, 4).permute(0, 2, 1, 3).reshape(8, 8)
    assert all(row.all() or not row.any() for row in blocks)
    channel = Channel().mask(torch.rand(6, 4, 3, 3), keep=2 * 36)
    assert sorted(channel.reshape(6, -1).all(dim=1).tolist()).count(True) == 2
    assert not (channel.reshape(6, -1).any(dim=1) & ~channel.reshape(6, -1).all(dim=1)).any()
    with pytest.raises(ValueError, match="block 3x3"):
        Block(3, 3).check("w", (8, 8))


def test_parse_structure_names():
    assert parse_structure("2:4") == NM(2, 4)
    assert parse_structure("block4x2") == Block(4, 2)
    assert parse_structure("channel") == Channel() and parse_structure("unstructured") == Unstructured()
    with pytest.raises(ValueError, match="unknown structure 'diagonal'"):
        parse_structure("diagonal")


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def test_snip_is_weight_times_gradient_and_leaves_model_untouched():
    model = _net()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    params = {"0.weight": model[0].weight, "2.weight": model[2].weight}
    scores = snip_scores(model, params, (x, y))
    loss = F.cross_entropy(model(x), y)
    grad = torch.autograd.grad(loss, [model[0].weight])[0]
    assert torch.allclose(scores["0.weight"], (model[0].weight * grad).abs())
    assert model[0].weight.grad is None


def test_grasp_score_is_weight_times_hessian_gradient():
    model = _net()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    params = {"0.weight": model[0].weight, "2.weight": model[2].weight}
    scores = grasp_scores(model, params, (x, y))
    weights = list(params.values())
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), weights, create_graph=True)
    hessian_grad = torch.autograd.grad(sum((g * g.detach()).sum() for g in grads), weights)
    assert torch.allclose(scores["2.weight"], model[2].weight.detach() * hessian_grad[1], atol=1e-6)


def test_synflow_is_data_free_and_zero_for_masked_weights():
    model = _net()
    params = {"0.weight": model[0].weight, "2.weight": model[2].weight}
    masks = {name: torch.rand(p.shape) > 0.5 for name, p in params.items()}
    scores = synflow_scores(model, params, (6,), masks)
    assert (scores["0.weight"][~masks["0.weight"]] == 0).all()
    assert (scores["0.weight"][masks["0.weight"]] > 0).any()


def test_data_scores_need_a_batch():
    model = _net()
    with pytest.raises(ValueError, match="'snip' score needs a data batch"):
        compute_scores("snip", model, {"0.weight": model[0].weight})
    with pytest.raises(ValueError, match="unknown score 'fisher'"):
        compute_scores("fisher", model, {"0.weight": model[0].weight})


def _stable_sort_topk(scores: torch.Tensor, keep: int) -> torch.Tensor:
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[torch.sort(scores.reshape(-1), descending=True, stable=True).indices[:keep]] = True
    return mask.view_as(scores)


def test_topk_mask_keeps_exactly_what_a_stable_descending_sort_keeps():
    # heavy ties, infinities and NaN: the O(n) top-k must break ties by position exactly like a stable sort
    generator = torch.Generator().manual_seed(0)
    for trial in range(400):
        n = int(torch.randint(1, 200, (1,), generator=generator))
        scores = torch.randint(-3, 4, (n, 1), generator=generator).float()
        scores[torch.rand(n, 1, generator=generator) < 0.2] = -math.inf
        if trial % 3 == 0:
            scores[torch.rand(n, 1, generator=generator) < 0.1] = math.nan
        if trial % 5 == 0:
            scores[torch.rand(n, 1, generator=generator) < 0.1] = math.inf
        if trial % 7 == 0:
            scores[torch.rand(n, 1, generator=generator) < 0.9] = math.nan
        keep = int(torch.randint(0, n + 1, (1,), generator=generator))
        mask = topk_mask(scores, keep)
        assert mask.shape == scores.shape and int(mask.sum()) == keep
        assert torch.equal(mask, _stable_sort_topk(scores, keep)), (scores.flatten().tolist(), keep)
    with pytest.raises(ValueError, match="keep must be in"):
        topk_mask(torch.zeros(3), 4)
