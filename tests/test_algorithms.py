"""Each algorithm's defining behaviour, the study arms, and the multi-phase drivers."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsearch as sa
from sparsearch.algorithms import ARMS, ArmSetting, nm_for_sparsity
from sparsearch.algorithms.imp import phase_sparsity
from sparsearch.sparsity.distribution import layer_keep_counts
from sparsearch.sparsity.schedules import Cubic


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))


def data(seed=0, n=64):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=generator)
    return x, (x[:, :4].argmax(dim=1) + (x[:, 4] > 1).long()) % 4


def step(model, optimizer, x, y):
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def test_rigl_grows_where_the_dense_gradient_is_largest_and_drops_smallest_weights():
    model = mlp()
    x, y = data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rigl = sa.RigL(0.8, update_every=10, total_steps=100, distribution="uniform").attach(model, optimizer)
    for _ in range(10):
        step(model, optimizer, x, y)
    old_masks = {k: v.clone() for k, v in rigl.masks.items()}
    old_weights = {k: p.detach().clone() for k, p in model.named_parameters()}
    # the dense gradient at the update step, computed exactly as the training step will
    dense_grad = torch.autograd.grad(F.cross_entropy(model(x), y), [model[0].weight])[0].abs()
    step(model, optimizer, x, y)  # the 11th step updates (10 steps done, a multiple of update_every)
    assert rigl.dense_gradient_steps == 1 and rigl.updates == 1
    old, new = old_masks["0.weight"], rigl.masks["0.weight"]
    assert int(new.sum()) == int(old.sum())  # constant sparsity
    # drop: the floor(alpha_t * active) smallest |w| (some may be grown back at once, keeping their value)
    n_drop = math.floor(rigl.drop_fraction(10) * int(old.sum()))
    smallest = torch.where(old, old_weights["0.weight"].abs(), math.inf).flatten().argsort()[:n_drop]
    expected_drop = torch.zeros(old.numel(), dtype=torch.bool)
    expected_drop[smallest] = True
    expected_drop = expected_drop.view_as(old)
    assert torch.equal(old & ~new, expected_drop & ~new)
    grown = new & ~old
    assert int(grown.sum()) > 0
    # grow: the largest |dense gradient| among the positions inactive after the drop
    regrown = expected_drop & new
    growth = grown | regrown
    assert float(dense_grad[growth].min()) >= float(dense_grad[~new].max()) - 1e-7
    # the regular step was skipped: grown weights are exactly zero and have zero momentum
    assert (model[0].weight.detach()[grown] == 0).all()
    assert (optimizer.state[model[0].weight]["momentum_buffer"][grown] == 0).all()
    assert torch.equal(model[0].weight.detach()[old & new], old_weights["0.weight"][old & new])


def test_rigl_drop_fraction_is_cosine_decayed_and_updates_stop():
    rigl = sa.RigL(0.9, total_steps=1000, update_every=100)
    assert rigl.stop_step == 750
    assert rigl.drop_fraction(0) == pytest.approx(0.3)
    assert rigl.drop_fraction(375) == pytest.approx(0.15)
    with pytest.raises(ValueError, match=r"stop=0\.75 is a fraction of training: pass total_steps"):
        sa.RigL(0.9)


def test_set_grows_at_random_and_drops_by_sign():
    grown_sets = []
    for seed in (10, 11):
        model = mlp()
        x, y = data()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        set_ = sa.SET(0.8, update_every=5, distribution="uniform", seed=0).attach(model, optimizer)
        for _ in range(5):
            step(model, optimizer, x, y)
        set_.generator.manual_seed(seed)  # same masks and weights so far; only the growth randomness differs
        weights = model[2].weight.detach().clone()
        old = set_.masks["2.weight"].clone()
        step(model, optimizer, x, y)  # the 6th step updates
        assert set_.updates == 1
        new = set_.masks["2.weight"]
        dropped, grown = old & ~new, new & ~old
        assert int(grown.sum()) == int(dropped.sum()) > 0  # constant sparsity
        positive, negative = old & (weights >= 0), old & (weights < 0)
        n_positive, n_negative = math.floor(0.3 * int(positive.sum())), math.floor(0.3 * int(negative.sum()))
        expected = torch.zeros(old.numel(), dtype=torch.bool)
        expected[torch.where(positive, weights, math.inf).flatten().argsort()[:n_positive]] = True
        expected[torch.where(negative, -weights, math.inf).flatten().argsort()[:n_negative]] = True
        assert torch.equal(dropped, expected.view_as(old) & ~new)  # smallest positive, negative closest to zero
        grown_sets.append(grown)
    assert not torch.equal(grown_sets[0], grown_sets[1])


def test_gmp_follows_the_cubic_schedule():
    model = mlp()
    x, y = data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gmp = sa.GMP(0.9, begin=10, end=60, update_every=10).attach(model, optimizer)
    shapes = {name: tuple(p.shape) for name, p in gmp.params.items()}
    schedule = Cubic(0.0, 0.9, 10, 60, every=10)
    assert all(bool(m.all()) for m in gmp.masks.values())  # starts dense
    previous = None
    for t in range(1, 71):
        step(model, optimizer, x, y)
        expected = layer_keep_counts(shapes, schedule(t), "uniform")
        assert {name: int(m.sum()) for name, m in gmp.masks.items()} == expected, f"step {t}"
        if previous is not None:
            assert not any((m & ~previous[n]).any() for n, m in gmp.masks.items())  # pruned weights never return
        previous = {k: v.clone() for k, v in gmp.masks.items()}
    assert gmp.overall_sparsity() == pytest.approx(0.9, abs=1e-3)


def test_srste_gradient_carries_its_decay_term_and_state_dict_keeps_dense_weights():
    model = mlp()
    keys = list(model.state_dict())
    x, y = data()
    srste = sa.SRSTE(2, 4, decay=0.1).attach(model, torch.optim.SGD(model.parameters(), lr=0.01))
    assert list(model.state_dict()) == keys
    mask = srste.masks["0.weight"]
    weight = model[0].weight.detach().clone()
    assert (weight[~mask] != 0).all()  # dense weights are kept
    F.cross_entropy(model(x), y).backward()
    # reference: the same loss with the masked weight as a plain tensor
    reference = mlp()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for i in (0, 2, 4):
            reference[i].weight.mul_(srste.masks[f"{i}.weight"])
    reference_loss = F.cross_entropy(reference(x), y)
    masked_grad = torch.autograd.grad(reference_loss, [reference[0].weight])[0]
    assert torch.allclose(model[0].weight.grad, masked_grad + 0.1 * (~mask) * weight, atol=1e-6)


def test_srste_nm_pattern_holds_after_training_and_finalize_bakes_it():
    model = mlp()
    x, y = data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    srste = sa.SRSTE(1, 4).attach(model, optimizer)
    for _ in range(30):
        step(model, optimizer, x, y)
    for name, mask in srste.masks.items():
        assert (mask.reshape(-1, 4).sum(dim=1) == 1).all(), name
    assert srste.overall_sparsity() == pytest.approx(0.75)
    srste.finalize()
    assert ((model[0].weight != 0).reshape(-1, 4).sum(dim=1) <= 1).all()
    assert "forward" not in model[0].__dict__


def test_nm_rejects_bad_shapes_through_the_algorithms():
    with pytest.raises(ValueError, match=r"input dimension of '0\.weight' to be divisible by M=8"):
        sa.SRSTE(2, 8).attach(nn.Sequential(nn.Linear(12, 8)))
    with pytest.raises(ValueError, match="1 <= N < M"):
        sa.PGF(4, 4)


def test_pgf_mask_decay_and_structure_decay():
    pgf = sa.PGF(2, 4, decay="linear", rate=0.01, dense_steps=10, finetune=80)
    assert pgf.beta(5) == 1.0 and pgf.beta(60) == pytest.approx(0.5) and pgf.beta(85) == 0.0
    exponential = sa.PGF(2, 4, decay="exponential", rate=0.01, finetune=None)
    assert exponential.beta(100) == pytest.approx(math.exp(-1))
    structure = sa.PGF(1, 8, method="structure", dense_steps=0, finetune=100)
    assert structure.pattern_steps == [7, 4, 2, 1]
    assert [structure.pattern(t).n for t in (0, 30, 60, 90, 100)] == [7, 4, 2, 1, 1]
    model = mlp()
    x, y = data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    pgf = sa.PGF(2, 4, rate=0.05, finetune=30).attach(model, optimizer)
    weight = model[0].weight.detach()
    mask = pgf.masks["0.weight"]
    step(model, optimizer, x, y)
    out = model[0](x)
    beta = pgf.beta(pgf.step)
    expected = F.linear(x, torch.where(pgf.masks["0.weight"], model[0].weight, model[0].weight * beta), model[0].bias)
    assert torch.allclose(out, expected) and 0 < beta < 1
    assert mask.shape == weight.shape


def _kept_are_the_top_scores(masks, scores):
    """Every kept weight scores at least as high as every dropped one, over all layers together (global)."""
    kept = torch.cat([scores[name][mask] for name, mask in masks.items()])
    dropped = torch.cat([scores[name][~mask] for name, mask in masks.items()])
    return float(kept.min()) >= float(dropped.max())


def test_static_methods_choose_masks_by_their_scores():
    from sparsearch.engine import default_sparsifiable_parameters
    from sparsearch.sparsity.scores import grasp_scores, snip_scores, synflow_scores

    x, y = data()
    for method, score in ((sa.SNIP, snip_scores), (sa.GraSP, grasp_scores)):
        reference = mlp()
        params = default_sparsifiable_parameters(reference)  # the same Linear weights, scored independently
        scores = score(reference, params, (x, y), F.cross_entropy)
        chosen = method(0.9, batch=(x, y)).attach(mlp())
        assert chosen.overall_sparsity() == pytest.approx(0.9, abs=1e-3)
        assert _kept_are_the_top_scores(chosen.masks, scores), method.__name__
        assert not _kept_are_the_top_scores(sa.StaticRandom(0.9).attach(mlp()).masks, scores)
    with pytest.raises(ValueError, match="needs a data batch"):
        sa.GraSP(0.9).attach(mlp())
    reference = mlp()
    one_round = synflow_scores(reference, default_sparsifiable_parameters(reference), (12,))
    assert _kept_are_the_top_scores(sa.SynFlow(0.95, rounds=1).attach(mlp()).masks, one_round)
    synflow = sa.SynFlow(0.95, rounds=20).attach(mlp())
    assert synflow.overall_sparsity() == pytest.approx(0.95, abs=1e-3)
    magnitude = sa.StaticMagnitude(0.5, distribution="uniform").attach(mlp())
    assert magnitude.masks["0.weight"].sum() == 12 * 32 // 2
    weights = mlp()[0].weight.abs()
    assert weights[magnitude.masks["0.weight"]].min() >= weights[~magnitude.masks["0.weight"]].max()


def test_imp_arm_prunes_in_phases_and_rewinds():
    model = mlp()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    arm = sa.IterativeMagnitudePruning(0.875, phases=3, total_steps=40, rewind_step=0).attach(model, optimizer)
    seen = []
    for t in range(1, 41):
        step(model, optimizer, x, y)
        if t % 10 == 0 and t <= 30:
            seen.append(1 - arm.density())
            kept = arm.masks["0.weight"]
            assert torch.equal(model[0].weight.detach()[kept], initial["0.weight"][kept])  # rewound to init
    assert seen == pytest.approx([phase_sparsity(0.875, k, 3) for k in (1, 2, 3)], abs=1e-3)
    assert phase_sparsity(0.875, 1, 3) == pytest.approx(0.5)


def _train_fn(seed, steps=15, weight_decay=0.0):
    def train(model, sparsifier):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=weight_decay)
        sparsifier.attach(model, optimizer)
        x, y = data(seed)
        for _ in range(steps):
            step(model, optimizer, x, y)

    return train


def test_imp_driver_reaches_target_and_rewinds():
    model = mlp()
    result = sa.imp(model, _train_fn(0), sparsity=0.9, phases=2, rewind_step=3)
    assert result.phase_sparsities == pytest.approx([1 - 0.1**0.5, 0.9])
    zeros = sum(int((~m).sum()) for m in result.masks.values())
    assert zeros / sum(m.numel() for m in result.masks.values()) == pytest.approx(0.9, abs=1e-3)
    for name, mask in result.masks.items():
        assert (dict(model.named_parameters())[name][~mask] == 0).all()


@pytest.mark.parametrize("greedy", [False, True])
def test_sparse_soups_keep_the_shared_mask(greedy):
    model = mlp()
    x, y = data(5)

    def val(m):
        with torch.no_grad():
            return float((m(x).argmax(1) == y).float().mean())

    ingredients = [_train_fn(1), _train_fn(2, weight_decay=1e-3), _train_fn(3)]
    result = sa.sparse_soup(model, ingredients, sparsity=0.8, phases=2, greedy=greedy, val_fn=val)
    for name, mask in result.masks.items():
        weight = dict(model.named_parameters())[name]
        assert (weight[~mask] == 0).all()
        assert (weight[mask] != 0).float().mean() > 0.95  # the average is a real model on the mask
    assert len(result.phase_scores) == 2
    with pytest.raises(ValueError, match="greedy soups need val_fn"):
        sa.sparse_soup(mlp(), ingredients, sparsity=0.8, greedy=True)


def test_nm_for_sparsity_picks_closest_pattern():
    assert str(nm_for_sparsity(0.5)) == "2:4"
    assert str(nm_for_sparsity(0.75)) == "1:4"
    assert str(nm_for_sparsity(0.9)) == "3:32"


@pytest.mark.parametrize("arm", ARMS.names())
def test_every_arm_trains_and_reports_its_sparsity(arm):
    x, y = data()
    setting = ArmSetting(sparsity=0.8, total_steps=40, steps_per_epoch=10, seed=0, distribution="erk", batch=(x, y))
    sparsifier = ARMS.get(arm)(setting)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsifier.attach(model, optimizer)
    losses = [step(model, optimizer, x, y) for _ in range(40)]
    assert math.isfinite(losses[-1])
    target = nm_for_sparsity(0.8).sparsity if arm in ("srste", "pgf") else 0.8
    if arm.startswith("sift-"):  # Sparse-IFT fixes each layer's count to the dense layer's, not the sparsity
        kept = sum(round((1 - s) * sparsifier.params[n].numel()) for n, s in sparsifier.plan.layer_sparsities.items())
        target = 1 - kept / sum(p.numel() for p in sparsifier.params.values())
    assert sparsifier.overall_sparsity() >= target - 1e-3
    # the trained weights themselves are sparse (N:M arms bake their mask after the last step)
    zeros = sum(int((p == 0).sum()) for p in sparsifier.params.values())
    assert zeros / sum(p.numel() for p in sparsifier.params.values()) >= target - 1e-3
