"""The node space on any model: unit groups found with torch.fx, residual/BatchNorm ties, layers kept whole."""

from __future__ import annotations

import copy
import hashlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsearch.engine.sparsifier import default_sparsifiable_parameters
from sparsearch.models import build_model
from sparsearch.search import NodeSpace, UnitSlot, WeightSpace, find_unit_groups, node_sparsity, weight_sparsity

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------- the package's own MLP and CNN
# Produced with the code at commit 20bfb10 (NodeSpace driven by the models' hidden_layers(), before this
# analysis existed): for each case, build_model(arch, input_shape, 10, widths=widths, seed=0), then
# NodeSpace(model, sparsity).achieved_sparsity and, for generator seeds 0, 1 and 7, _digest(space.sample(
# torch.Generator().manual_seed(seed))). The default study's node-space numbers depend on exactly these masks.
REFERENCE_NODE_MASKS = {
    ("mlp", (40,), None, 0.0): (0.0, ["0a26cf7c2fb85621", "0a26cf7c2fb85621", "0a26cf7c2fb85621"]),
    ("mlp", (40,), None, 0.5): (0.49945226014760147, ["bbbefa406b6c8628", "a28dbc7acf59d731", "d866db22d038ad7e"]),
    ("mlp", (40,), None, 0.9): (0.9003113468634686, ["9e06347ddd6c3a94", "a28ceb5ffc82e4ff", "e36fcbf15d64e367"]),
    ("mlp", (40,), None, 0.99): (0.9899100553505535, ["24fdececa3e498e0", "2fb96933bdf1cf6f", "8ee91a476120a50d"]),
    ("mlp", (1, 8, 8), (24, 16), 0.0): (0.0, ["280f1192831f86ea", "280f1192831f86ea", "280f1192831f86ea"]),
    ("mlp", (1, 8, 8), (24, 16), 0.5): (
        0.5004807692307692,
        ["0e29c80441d059b4", "7c06e0de20f628a4", "a02279a7eb89b488"],
    ),
    ("mlp", (1, 8, 8), (24, 16), 0.9): (
        0.8951923076923077,
        ["a72ce4f3d60cf049", "da1e4f5d9b4b1062", "f38ebe0c112435d7"],
    ),
    ("mlp", (1, 8, 8), (24, 16), 0.99): (
        0.9639423076923077,
        ["c3c6e7a017432414", "fd00bdde12d9b951", "22b9af193d1f8b03"],
    ),
    ("cnn", (40,), None, 0.0): (0.0, ["4a624a197b6cc836", "4a624a197b6cc836", "4a624a197b6cc836"]),
    ("cnn", (40,), None, 0.5): (0.506161971830986, ["ba33ec117348cc33", "392656470c8fb59c", "d692bdbd241fe8ad"]),
    ("cnn", (40,), None, 0.9): (0.9009683098591549, ["2ea7792f0b4b8c77", "60da2a5d65399dfe", "29eb224c1576193d"]),
    ("cnn", (40,), None, 0.99): (0.9903169014084507, ["d322b25782a43b0b", "9c5e012ed6b6b5aa", "fc4f8f86868b6dba"]),
    ("cnn", (1, 8, 8), None, 0.0): (0.0, ["056039cb06fdbea9", "056039cb06fdbea9", "056039cb06fdbea9"]),
    ("cnn", (1, 8, 8), None, 0.5): (0.4984881900967558, ["b9f18b7cad0d5354", "17ddc062693a1330", "b62b36ff65dd65bd"]),
    ("cnn", (1, 8, 8), None, 0.9): (0.8987976664769494, ["8343cd2200197148", "13f9de33a15a2481", "5a8d8a805069ae79"]),
    ("cnn", (1, 8, 8), None, 0.99): (0.9898086226522481, ["ae11e99cb57ac8c1", "db3c0eb29a450f9d", "f13136ddd8e5a1a3"]),
    ("cnn", (3, 12, 10), (6, 5, 7), 0.0): (0.0, ["1aa5d8bbf6fef2ea", "1aa5d8bbf6fef2ea", "1aa5d8bbf6fef2ea"]),
    ("cnn", (3, 12, 10), (6, 5, 7), 0.5): (
        0.5091799265605875,
        ["17ea62544f1694e5", "218e0e5ab41beaa2", "72f11dec872cabb8"],
    ),
    ("cnn", (3, 12, 10), (6, 5, 7), 0.9): (
        0.9094247246022031,
        ["26f854869f025e3b", "962479fa2a81a984", "db708941538c68a9"],
    ),
    ("cnn", (3, 12, 10), (6, 5, 7), 0.99): (
        0.9326805385556916,
        ["3363b7dc65a30372", "e54a32028713e038", "b7c7a51487dfe395"],
    ),
    ("cnn", (2, 30), (4, 9), 0.0): (0.0, ["045b0d548bd6dc39", "045b0d548bd6dc39", "045b0d548bd6dc39"]),
    ("cnn", (2, 30), (4, 9), 0.5): (0.5058823529411764, ["46536d229322775a", "34fee32e8d76f3fd", "81d24bb56bfce5c0"]),
    ("cnn", (2, 30), (4, 9), 0.9): (0.9, ["72f98d0b116d850a", "996c069d17a9a42d", "5684a2af0e32ac86"]),
    ("cnn", (2, 30), (4, 9), 0.99): (0.9, ["72f98d0b116d850a", "996c069d17a9a42d", "5684a2af0e32ac86"]),
}
# node_sparsity(model, WeightSpace(model, sparsity, "uniform").sample(torch.Generator().manual_seed(0))) for
# sparsity 0.9, 0.99, 0.999, with the same models, at commit 20bfb10 (the study records it for every trial)
REFERENCE_NODE_SPARSITY_OF_WEIGHT_MASKS = {
    ("mlp", (40,), None): [0.078125, 0.478125, 0.9578125],
    ("mlp", (1, 8, 8), (24, 16)): [0.225, 0.95, 1.0],
    ("cnn", (40,), None): [0.125, 0.55625, 0.9875],
    ("cnn", (1, 8, 8), None): [0.2375, 0.55625, 0.96875],
    ("cnn", (3, 12, 10), (6, 5, 7)): [0.16666666666666666, 0.8333333333333334, 1.0],
    ("cnn", (2, 30), (4, 9)): [0.15384615384615385, 0.9230769230769231, 1.0],
}


def _digest(masks: dict[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(masks):
        digest.update(name.encode())
        digest.update(str(tuple(masks[name].shape)).encode())
        digest.update(masks[name].to(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


@pytest.mark.parametrize(("case", "expected"), list(REFERENCE_NODE_MASKS.items()), ids=str)
def test_own_models_get_exactly_the_masks_they_got_before_the_analysis(case, expected):
    arch, input_shape, widths, sparsity = case
    space = NodeSpace(build_model(arch, input_shape, 10, widths=widths, seed=0), sparsity)
    achieved, digests = expected
    assert space.achieved_sparsity == achieved
    assert [_digest(space.sample(torch.Generator().manual_seed(seed))) for seed in (0, 1, 7)] == digests


@pytest.mark.parametrize(("case", "expected"), list(REFERENCE_NODE_SPARSITY_OF_WEIGHT_MASKS.items()), ids=str)
def test_own_models_node_sparsity_of_unstructured_masks_is_unchanged(case, expected):
    arch, input_shape, widths = case
    model = build_model(arch, input_shape, 10, widths=widths, seed=0)
    masks = [WeightSpace(model, s, "uniform").sample(torch.Generator().manual_seed(0)) for s in (0.9, 0.99, 0.999)]
    assert [node_sparsity(model, m) for m in masks] == expected


def test_own_mlp_notes_only_its_output_layer():
    space = NodeSpace(build_model("mlp", (40,), 10, seed=0), 0.5)
    assert [group.name for group in space.groups] == ["layers.0.weight", "layers.1.weight", "layers.2.weight"]
    assert space.notes == ("layers.3 (Linear): all units kept: they are the model's output",)


# ------------------------------------------------------------------------------- models not of the package
class Block(nn.Module):
    """A ResNet basic block: conv-BN-ReLU-conv-BN plus a shortcut (a 1x1 conv + BN where the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, widths: tuple[int, int] = (8, 16)) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, widths[0], 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        self.layer1 = nn.Sequential(Block(widths[0], widths[0]), Block(widths[0], widths[0]))
        self.layer2 = nn.Sequential(Block(widths[0], widths[1], 2), Block(widths[1], widths[1]))
        self.fc = nn.Linear(widths[1], 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(x.view(x.size(0), -1))


def _resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = ResNet()
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine terms, so that removed channels matter
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_()
                module.bias.normal_()
    return model.eval()


def _apply(model: nn.Module, masks: dict[str, Tensor]) -> nn.Module:
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in masked.named_parameters():
            if name in masks:
                parameter.mul_(masks[name])
    return masked


def _physically_smaller(model: nn.Module, masks: dict[str, Tensor], space: NodeSpace) -> nn.Module:
    """A copy of ``model`` without the removed units: smaller weights, BatchNorms and biases."""
    small = copy.deepcopy(model)
    modules = dict(small.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            module = modules[name.removesuffix(".weight")]
            rows = mask.reshape(mask.shape[0], -1).any(dim=1)
            columns = mask.transpose(0, 1).reshape(mask.shape[1], -1).any(dim=1)
            module.weight = nn.Parameter(module.weight[rows][:, columns])
            if module.bias is not None:
                module.bias = nn.Parameter(module.bias[rows])
        for group in space.groups:
            producer = group.producers[0]
            kept = masks[producer.parameter][producer.offset : producer.offset + group.units]
            kept = kept.reshape(group.units, -1).any(dim=1)
            for norm in group.norms:
                bn = modules[norm]
                bn.weight, bn.bias = nn.Parameter(bn.weight[kept]), nn.Parameter(bn.bias[kept])
                bn.running_mean, bn.running_var = bn.running_mean[kept], bn.running_var[kept]
    return small


def test_resnet_channels_tied_by_residual_adds_form_one_group_with_their_batchnorms():
    space = NodeSpace(_resnet(), 0.6)
    by_name = {group.name: group for group in space.groups}
    stem = by_name["stem.weight"]
    # the stem and every conv2 whose output is added to the stem's channels share one set of channels
    assert {slot.parameter for slot in stem.producers} == {
        "stem.weight",
        "layer1.0.conv2.weight",
        "layer1.1.conv2.weight",
    }
    assert set(stem.norms) == {"bn", "layer1.0.bn2", "layer1.1.bn2"}
    assert {slot.parameter for slot in stem.consumers} == {
        "layer1.0.conv1.weight",
        "layer1.1.conv1.weight",
        "layer2.0.conv1.weight",
        "layer2.0.shortcut.0.weight",
    }
    stage2 = by_name["layer2.0.conv2.weight"]
    assert {slot.parameter for slot in stage2.producers} == {
        "layer2.0.conv2.weight",
        "layer2.0.shortcut.0.weight",
        "layer2.1.conv2.weight",
    }
    assert {slot.parameter for slot in stage2.consumers} == {"layer2.1.conv1.weight", "fc.weight"}
    assert len(space.groups) == 6  # 2 residual streams + 4 inner block channels
    assert space.notes == ("fc (Linear): all units kept: they are the model's output",)


@pytest.mark.parametrize("seed", [0, 1])
def test_masked_resnet_computes_what_the_physically_smaller_resnet_computes(seed):
    model = _resnet(seed)
    space = NodeSpace(model, 0.7)
    masks = space.sample(torch.Generator().manual_seed(seed))
    small = _physically_smaller(model, masks, space)
    kept = small.stem.weight.shape[0]
    assert kept == space.kept_units["stem.weight"] < 8
    assert small.layer1[0].conv2.weight.shape[0] == kept  # the tied convs shrank together
    x = torch.randn(3, 1, 12, 12)
    torch.testing.assert_close(_apply(model, masks)(x), small(x), rtol=1e-5, atol=1e-5)
    # and the full model's answer did change: something was really removed
    assert not torch.allclose(model(x), small(x), atol=1e-3)
    assert weight_sparsity(masks) == pytest.approx(space.achieved_sparsity, abs=1e-12)
    assert node_sparsity(model, masks) == pytest.approx(space.achieved_node_sparsity)


def test_resnet_node_space_hits_the_budget_as_closely_as_its_whole_channels_allow():
    model = _resnet()
    total = sum(p.numel() for p in default_sparsifiable_parameters(model).values())
    for sparsity in (0.3, 0.5, 0.7, 0.9):
        space = NodeSpace(model, sparsity)
        target = (1 - sparsity) * total
        best = min(  # independent check: the best error of any common keep fraction on a fine grid
            abs(space._kept_weights({g.name: max(1, round(step / 2000 * g.units)) for g in space.groups}) - target)
            for step in range(1, 2001)
        )
        assert abs(space.achieved_sparsity - sparsity) <= best / total + 1e-12
        masks = space.sample(torch.Generator().manual_seed(0))
        assert weight_sparsity(masks) == pytest.approx(space.achieved_sparsity, abs=1e-12)


def _removed_units_contribute_nothing(model: nn.Module, space: NodeSpace, x: Tensor, seed: int = 0) -> None:
    """Mask, then perturb the biases of every removed unit's producers: the output must not move."""
    masks = space.sample(torch.Generator().manual_seed(seed))
    masked = _apply(model, masks)
    before = masked(x)
    modules = dict(masked.named_modules())
    removed_any = False
    with torch.no_grad():
        for group in space.groups:
            for slot in group.producers:
                rows = masks[slot.parameter][slot.offset : slot.offset + group.units]
                removed = ~rows.reshape(group.units, -1).any(dim=1)
                removed_any |= bool(removed.any())
                bias = modules[slot.parameter.removesuffix(".weight")].bias
                if bias is not None:
                    bias[slot.offset : slot.offset + group.units][removed] += 10.0
    assert removed_any
    torch.testing.assert_close(masked(x), before, rtol=0, atol=0)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.ff = nn.Linear(16, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        h, _ = self.attn(h, h, h)
        return self.head(F.gelu(self.ff(h)).mean(dim=-2))  # dim=1 would need the rank, unknown here


def test_attention_projections_are_kept_whole_with_a_note_and_the_rest_is_searched():
    torch.manual_seed(0)
    model = Attention().eval()
    space = NodeSpace(model, 0.3)
    assert [group.name for group in space.groups] == ["ff.weight"]
    assert space.notes == (
        "embed (Linear): all units kept: they are read by attn (MultiheadAttention), which the analysis does "
        "not understand as per-unit",
        "attn (MultiheadAttention).in_proj_weight: all units kept: it is not the weight of a Linear or Conv layer "
        "(attention projection)",
        "attn.out_proj (NonDynamicallyQuantizableLinear): all units kept: it runs inside attn "
        "(MultiheadAttention), whose computation the analysis does not look into",
        "head (Linear): all units kept: they are the model's output",
    )
    masks = space.sample(torch.Generator().manual_seed(0))
    assert masks["attn.out_proj.weight"].all() and masks["embed.weight"].all()
    assert masks["attn.in_proj_weight"].all()
    assert not masks["ff.weight"].all()
    _removed_units_contribute_nothing(model, space, torch.randn(2, 5, 6))
    assert node_sparsity(model, masks) == pytest.approx(space.achieved_node_sparsity)


class Concat(nn.Module):
    """Two conv branches concatenated along channels, read by a conv and (flattened) by the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(1, 6, 3, padding=1)
        self.c = nn.Conv2d(10, 5, 3, padding=1)
        self.fc = nn.Linear((5 + 10) * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        z = F.relu(self.c(y))
        both = F.max_pool2d(torch.cat([z, y], 1), 2)
        return self.fc(torch.flatten(both, 1))


def test_concatenated_channels_keep_their_offsets_in_every_reader():
    torch.manual_seed(0)
    model = Concat()
    space = NodeSpace(model, 0.5)
    by_name = {group.name: group for group in space.groups}
    assert set(by_name) == {"a.weight", "b.weight", "c.weight"}
    assert set(by_name["b.weight"].consumers) == {UnitSlot("c.weight", 4), UnitSlot("fc.weight", (5 + 4) * 16, 16)}
    assert set(by_name["c.weight"].consumers) == {UnitSlot("fc.weight", 0, 16)}
    masks = space.sample(torch.Generator().manual_seed(1))
    removed_b = ~masks["b.weight"].reshape(6, -1).any(dim=1)
    assert torch.equal(~masks["c.weight"][:, 4:].reshape(5, 6, -1).any(dim=2).any(dim=0), removed_b)
    _removed_units_contribute_nothing(model, space, torch.randn(2, 1, 8, 8), seed=1)
    assert node_sparsity(model, masks) == pytest.approx(space.achieved_node_sparsity)


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv1d(2, 8, 3, padding=1)
        self.depthwise = nn.Conv1d(8, 8, 3, padding=1, groups=8)
        self.project = nn.Conv1d(8, 6, 1)
        self.grouped = nn.Conv1d(6, 4, 3, padding=1, groups=2)
        self.fc = nn.Linear(4 * 10, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.depthwise(F.relu(self.expand(x))))
        return self.fc(F.relu(self.grouped(self.project(h))).flatten(1))


def test_depthwise_conv_is_tied_to_its_input_and_a_grouped_convs_input_is_kept_whole():
    torch.manual_seed(0)
    model = Grouped()
    space = NodeSpace(model, 0.4)
    by_name = {group.name: group for group in space.groups}
    assert set(by_name) == {"expand.weight", "grouped.weight"}
    assert by_name["expand.weight"].producers == (UnitSlot("expand.weight"), UnitSlot("depthwise.weight"))
    assert by_name["expand.weight"].consumers == (UnitSlot("project.weight"),)
    assert by_name["grouped.weight"].consumers == (UnitSlot("fc.weight", 0, 10),)
    assert "project (Conv1d): all units kept: they are read by grouped (Conv1d), a grouped convolution (groups=2)" in (
        space.notes
    )
    masks = space.sample(torch.Generator().manual_seed(0))
    removed = ~masks["expand.weight"].reshape(8, -1).any(dim=1)
    assert torch.equal(~masks["depthwise.weight"].reshape(8, -1).any(dim=1), removed)
    _removed_units_contribute_nothing(model, space, torch.randn(2, 2, 10))
    assert node_sparsity(model, masks) == pytest.approx(space.achieved_node_sparsity)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        if h.sum() > 0:  # control flow on a tensor's value: torch.fx cannot trace it
            h = F.relu(h)
        return self.b(h)


def test_an_untraceable_model_is_refused_with_the_tracing_error_and_has_no_node_sparsity():
    model = DataDependent()
    analysis = find_unit_groups(model)
    assert analysis.groups == ()
    assert len(analysis.notes) == 2
    assert analysis.notes[0].startswith("a (Linear): all units kept: torch.fx cannot trace DataDependent (TraceError:")
    with pytest.raises(ValueError, match=r"no unit of DataDependent can be removed: the node space is empty \(a "):
        NodeSpace(model, 0.5)
    masks = WeightSpace(model, 0.5).sample(torch.Generator().manual_seed(0))
    assert math.isnan(node_sparsity(model, masks))


class TiedHead(nn.Module):
    """A language-model-like net: the output head shares the embedding's weight; a LayerNorm in between."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(20, 8)
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.embedding.weight

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embedding(tokens)
        h = h + self.down(F.relu(self.up(h)))
        return self.head(self.norm(h))


def test_tied_head_and_layer_norm_are_kept_whole_and_the_mlp_between_is_searched():
    model = TiedHead()
    space = NodeSpace(model, 0.5)
    assert [group.name for group in space.groups] == ["up.weight"]
    assert space.notes == (
        "down (Linear): all units kept: they are read by norm (LayerNorm), which the analysis does not "
        "understand as per-unit",
    )
    # the head shares the embedding's tensor, which the engine leaves dense: it is no masked weight at all
    assert "head.weight" not in space.sample(torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 20, (2, 5))
    _removed_units_contribute_nothing(model, space, tokens)


class Awkward(nn.Module):
    """A weight read as a tensor, a layer called twice, a reshape that mixes units."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.shared, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.linear(F.relu(self.a(x)), self.b.weight)
        h = self.shared(self.shared(h))
        return self.c(h.reshape(-1, 3, 2).flatten(1))


def test_weights_read_directly_shared_layers_and_mixing_reshapes_are_kept_whole():
    analysis = find_unit_groups(Awkward())
    assert analysis.groups == ()
    assert analysis.notes == (
        "a (Linear): all units kept: they are read by linear, which the analysis does not understand as per-unit",
        "b (Linear): all units kept: the forward code reads its weight directly as a tensor",
        # the second call's units are reshaped into (3, 2) pairs: mixed, kept whole for that reason as well
        "shared (Linear): all units kept: it is called 2 times (shared layer); they are read by shared (Linear), "
        "which is kept whole; .reshape() reshapes them",
        "c (Linear): all units kept: they are the model's output",
    )


def test_batchnorm1d_ties_to_a_linear_only_where_the_rank_is_known():
    flattened = nn.Sequential(nn.Flatten(), nn.Linear(10, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    space = NodeSpace(flattened, 0.3)
    assert [(group.name, group.norms) for group in space.groups] == [("1.weight", ("2",))]
    _removed_units_contribute_nothing(flattened.eval(), space, torch.randn(4, 2, 5))
    # without the flatten the input could be (N, C) or (N, L, C), and BatchNorm1d normalises axis 1 of both
    unflattened = nn.Sequential(nn.Linear(10, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    analysis = find_unit_groups(unflattened)
    assert analysis.groups == ()
    assert analysis.notes[0] == (
        "0 (Linear): all units kept: 1 (BatchNorm1d) normalises axis 1 of a tensor whose rank is unknown "
        "(flatten the input first)"
    )


class SqueezeExcite(nn.Module):
    """Channels gated by a squeeze-and-excitation branch: the gate multiplies them, per channel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.squeeze, self.excite = nn.Linear(8, 4), nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv(x))
        gate = torch.sigmoid(self.excite(F.relu(self.squeeze(h.mean((2, 3))))))
        h = h * gate.view(gate.size(0), 8, 1, 1)
        return self.head(h.mean((-2, -1)))


def test_channels_gated_by_squeeze_excitation_stay_removable_and_the_gate_is_kept_whole():
    torch.manual_seed(0)
    model = SqueezeExcite()
    space = NodeSpace(model, 0.4)
    by_name = {group.name: group for group in space.groups}
    assert set(by_name) == {"conv.weight", "squeeze.weight"}
    assert {slot.parameter for slot in by_name["conv.weight"].consumers} == {"squeeze.weight", "head.weight"}
    assert "excite (Linear): all units kept: .view() reshapes them" in space.notes
    _removed_units_contribute_nothing(model, space, torch.randn(2, 3, 9, 9))


class ScaledLinear(nn.Linear):
    """A user's Linear subclass with the base forward (fx would otherwise trace into it)."""


class LoRALinear(nn.Linear):
    """A Linear subclass with its own forward: traced through, its weight is read as a tensor."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias) * 2.0


def test_subclasses_of_linear_keep_the_analysis_unless_they_change_forward():
    model = nn.Sequential(nn.Flatten(), ScaledLinear(6, 8), nn.ReLU(), ScaledLinear(8, 5), nn.ReLU(), LoRALinear(5, 2))
    analysis = find_unit_groups(model)
    assert [(group.name, group.consumers) for group in analysis.groups] == [("1.weight", (UnitSlot("3.weight"),))]
    assert analysis.notes == (
        "3 (ScaledLinear): all units kept: they are read by linear, which the analysis does not understand as per-unit",
        "5 (LoRALinear): all units kept: the forward code reads its weight directly as a tensor",
    )
