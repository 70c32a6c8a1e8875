"""A user's model, not one of the package's: Embedding + Conv1d + BatchNorm + TransformerEncoderLayer + a head tied
to the embedding, trained with AdamW, clip_grad_norm_ and OneCycleLR through every algorithm arm, saved,
reloaded and compared."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsearch as sa
from sparsearch.algorithms import ARMS, ArmSetting

VOCAB, WIDTH, LENGTH, BATCH = 32, 32, 12, 8


class TiedTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, WIDTH)
        self.conv = nn.Conv1d(WIDTH, WIDTH, 3, padding=1)
        self.norm = nn.BatchNorm1d(WIDTH)
        self.encoder = nn.TransformerEncoderLayer(WIDTH, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.embedding.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens)
        x = x + self.norm(self.conv(x.transpose(1, 2))).transpose(1, 2)
        return self.head(self.encoder(x)).flatten(0, 1)  # [batch * length, vocab] for F.cross_entropy


def batches(steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        tokens = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=generator)
        out.append((tokens, ((tokens * 3 + 1) % VOCAB).flatten()))
    return out


def build(arm: str, total_steps: int, batch: tuple[torch.Tensor, torch.Tensor], seed: int = 0):
    torch.manual_seed(seed)
    model = TiedTransformer()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=total_steps + 10)
    setting = ArmSetting(
        sparsity=0.8, total_steps=total_steps, steps_per_epoch=4, seed=seed, distribution="uniform", batch=batch
    )
    if arm == "synflow":  # the arm's 100 rounds, 5 here: the test is about the model, not SynFlow's schedule
        sparsifier = sa.SynFlow(0.8, distribution="uniform", rounds=5, seed=seed, batch=batch)
    else:
        sparsifier = ARMS.get(arm)(setting)
    sparsifier.attach(model, optimizer)
    return model, optimizer, schedule, sparsifier


def masked_gradient_norm(sparsifier: sa.Sparsifier, model: nn.Module) -> float:
    masks = sparsifier.masks
    squares = 0.0
    for name, param in model.named_parameters():
        if param.grad is not None:
            grad = param.grad * masks[name] if name in masks and sparsifier.masks_weights else param.grad
            squares += float(grad.double().pow(2).sum())
    return squares**0.5


@pytest.mark.parametrize("arm", ARMS.names())
def test_every_arm_trains_clips_saves_and_reloads_the_tied_transformer(arm, tmp_path):
    total_steps = 12
    data = batches(total_steps + 1)
    if arm.startswith("sift-"):
        # Sparse-IFT replaces layers by other modules: attention's projections, the encoder layer's fast-path
        # linears and the tied head cannot be replaced, the first and last layers are skipped, so nothing is left
        # to transform in this model (and widening needs to know which layer reads which): refused, saying why
        reason = "Sparse Wide needs to know which layers" if arm == "sift-wide" else "no Linear/Conv layer between"
        with pytest.raises(ValueError, match=reason):
            build(arm, total_steps, data[0])
        return
    model, optimizer, schedule, sparsifier = build(arm, total_steps, data[0])
    embedding_before = model.embedding.weight.detach().clone()
    # the tied head/embedding tensor is not masked by default (it is the embedding table)
    assert "embedding.weight" not in sparsifier.params and "head.weight" not in sparsifier.params
    assert (model.embedding.weight == embedding_before).all()
    if sparsifier.masks_weights:
        assert "encoder.self_attn.in_proj_weight" in sparsifier.params
    else:  # forward masking cannot reach what nn.MultiheadAttention reads itself: left dense, not half-masked
        assert not any("self_attn" in name for name in sparsifier.params)
    losses = []
    for tokens, targets in data[:total_steps]:
        loss = F.cross_entropy(model(tokens), targets)
        loss.backward()
        usable_norm = masked_gradient_norm(sparsifier, model)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if not sparsifier.keeps_gradients_dense():
            # what clip_grad_norm_ measured is the gradient the optimizer uses (masked positions zero)
            assert float(norm) == pytest.approx(usable_norm, rel=1e-4)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert (model.embedding.weight != 0).float().mean() > 0.99  # the embedding stayed dense
    path = sa.save(model, tmp_path / "model.safetensors", sparsifier=sparsifier, optimizer=optimizer)

    model2, optimizer2, schedule2, sparsifier2 = build(arm, total_steps, data[0], seed=1)
    sa.load(model2, path, sparsifier=sparsifier2, optimizer=optimizer2)
    schedule2.load_state_dict(schedule.state_dict())
    model.eval(), model2.eval()
    probe = data[-1][0]
    with torch.no_grad():
        assert torch.equal(model(probe), model2(probe))
    assert model2.head.weight is model2.embedding.weight  # the tie survives loading
    # resume: one more identical step on both gives identical weights
    model.train(), model2.train()
    for m, opt, sched in ((model, optimizer, schedule), (model2, optimizer2, schedule2)):
        F.cross_entropy(m(data[-1][0]), data[-1][1]).backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    for (name, p1), p2 in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(p1, p2), name
    # convert: the inference copy computes what the trained model computes
    # (issue 10 point 2, runtime engineer: forced conversion of the attention/feed-forward Linears goes here)
    model.eval()
    fast = sa.runtime.convert(model, repeats=2)
    with torch.no_grad():
        assert torch.allclose(fast(probe), model(probe), atol=1e-5)


def test_tied_head_is_masked_once_when_asked_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = TiedTransformer()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # asked by the head's name: the one shared tensor is masked once, under its canonical name
    sparsifier = sa.StaticMagnitude(0.5, include=r"^head\.weight$").attach(model, optimizer)
    assert list(sparsifier.params) == ["embedding.weight"]
    assert float((model.head.weight == 0).float().mean()) == pytest.approx(0.5)
    path = sa.save(model, tmp_path / "tied.safetensors", sparsifier=sparsifier, optimizer=optimizer)
    torch.manual_seed(1)
    model2 = TiedTransformer()
    optimizer2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    sparsifier2 = sa.StaticMagnitude(0.5, include=r"^head\.weight$").attach(model2, optimizer2)
    sa.load(model2, path, sparsifier=sparsifier2, optimizer=optimizer2)
    assert torch.equal(model2.head.weight, model.head.weight)


def test_clip_grad_norm_sees_the_masked_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 50), nn.ReLU(), nn.Linear(50, 5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = sa.StaticRandom(0.9, seed=0).attach(model, optimizer)
    x, y = torch.randn(16, 20), torch.randint(0, 5, (16,))
    F.cross_entropy(model(x), y).backward()
    for name, mask in sparsifier.masks.items():
        assert not model.get_parameter(name).grad[~mask].any(), name
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    assert float(norm) > 0
    # gradient accumulation: a second backward adds only at kept positions
    F.cross_entropy(model(x), y).backward()
    for name, mask in sparsifier.masks.items():
        assert not model.get_parameter(name).grad[~mask].any(), name


def test_rigl_grows_from_dense_gradients_on_its_update_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 50), nn.ReLU(), nn.Linear(50, 5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = sa.RigL(0.9, update_every=2, total_steps=10, seed=0).attach(model, optimizer)
    x, y = torch.randn(16, 20), torch.randint(0, 5, (16,))
    seen_dense = []
    for _ in range(3):
        F.cross_entropy(model(x), y).backward()
        masked_grad = {n: model.get_parameter(n).grad[~m] for n, m in sparsifier.masks.items()}
        seen_dense.append(any(bool(g.any()) for g in masked_grad.values()))
        before = {n: m.clone() for n, m in sparsifier.masks.items()}
        optimizer.step()
        optimizer.zero_grad()
    # step 2 is an update step: its gradients stay dense (and the mask changed); the others are masked
    assert seen_dense == [False, False, True]
    assert any(not torch.equal(before[n], m) for n, m in sparsifier.masks.items())


def test_random_masks_do_not_follow_the_models_initialisation():
    # torch.manual_seed(0) initialises the model; seed=0 must not replay that stream into the mask's scores
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 10))
    weight = model[0].weight.detach().clone()
    mask = sa.StaticRandom(0.9, distribution="uniform", seed=0).attach(model).masks["0.weight"]
    positive = float((weight[mask] > 0).float().mean())
    assert 0.45 < positive < 0.55  # before the fix: 1.0 (the mask kept the largest positive weights)


def test_rescaled_init_restores_each_layers_signal_scale():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(400, 400), nn.Linear(400, 400))
    dense = [model[i].weight.detach().clone() for i in (0, 1)]
    sparsifier = sa.StaticRandom(0.9, distribution="uniform", init="rescale").attach(model)
    for i in (0, 1):
        mask = sparsifier.masks[f"{i}.weight"]
        assert torch.allclose(model[i].weight[mask], dense[i][mask] * 10**0.5)
    with pytest.raises(ValueError, match="init must be one of 'dense', 'rescale', got 'kaiming'"):
        sa.StaticRandom(0.9, init="kaiming")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: sa.RigL(0.9, total_steps=130), r"RigL would never update its mask: .*update_every=100.*stop=0\.75"),
        (lambda: sa.SET(0.9, update_every=50, total_steps=50), r"SET would never update .*total_steps=50"),
        (lambda: sa.RigL(0.9, total_steps=0), r"total_steps must be a positive number of optimizer steps, got 0"),
        (lambda: sa.RigL(0.9, total_steps=-5), r"total_steps must be .* got -5"),
        (lambda: sa.GMP(0.9, total_steps=-5), r"total_steps must be .* got -5"),
        (lambda: sa.GMP(0.9, end=1000, total_steps=500), r"GMP would never reach sparsity 0\.9: .*end=1000"),
        (lambda: sa.SRSTE(total_steps=0), r"total_steps must be .* got 0"),
        (lambda: sa.IterativeMagnitudePruning(0.9, total_steps=-1), r"total_steps must be .* got -1"),
    ],
)
def test_schedules_that_cannot_work_are_refused_naming_the_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_set_and_rigl_share_the_drop_fraction_name():
    model = nn.Sequential(nn.Linear(10, 10))
    assert sa.SET(0.5, update_every=10, drop_fraction=0.2).drop_fraction(0) == pytest.approx(0.2)
    with pytest.warns(DeprecationWarning, match="drop_fraction"):
        assert sa.SET(0.5, update_every=10, zeta=0.1).drop_fraction(0) == pytest.approx(0.1)
    assert sa.RigL(0.5, drop_fraction=0.2, stop=None).attach(model).drop_fraction(0) == pytest.approx(0.2)


def test_report_is_a_readable_table_of_rounded_rows():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 30), nn.Linear(30, 3))
    report = sa.StaticRandom(0.9, distribution="uniform").attach(model).report()
    assert isinstance(report, sa.SparsityReport)
    assert [row.name for row in report] == ["0.weight", "1.weight"]
    assert report[0].target_sparsity == round(report[0].target_sparsity, 6)
    text = str(report)
    assert "0.weight" in text and "overall" in text and "90.00%" in text


def test_save_to_a_directory_is_refused(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="is a directory; pass a file path"):
        sa.save(model, tmp_path)


def test_a_checkpoint_of_another_configuration_is_refused_with_the_differences(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 4))
    path = sa.save(model, tmp_path / "rigl.safetensors", sparsifier=sa.RigL(0.9, stop=None).attach(model))
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 4))
    sparsifier = sa.SET(0.5, update_every=10).attach(other)
    with pytest.raises(ValueError, match=r"algorithm: checkpoint 'RigL', this sparsifier 'SET'.*sparsity: "):
        sa.load(other, path, sparsifier=sparsifier)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sa.load(other, path, sparsifier=sparsifier, strict=False)
    assert any("differently configured" in str(w.message) for w in caught)
    assert sparsifier.overall_sparsity() == pytest.approx(0.9, abs=0.01)  # the checkpoint's masks


def test_ship_snippet_names_resolve():
    assert callable(sa.runtime.convert_with_report) and callable(sa.runtime.save_sparse)
