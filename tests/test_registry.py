import pytest

from sparsearch.registry import Registry, UnknownNameError, resolve_reference


def test_decorator_registers_and_unknown_name_lists_allowed():
    registry: Registry = Registry("widget", "sparsearch.test-widgets")

    @registry.register("a")
    def make_a() -> int:
        return 1

    assert registry.get("a") is make_a
    assert registry.names() == ("a",)
    assert "a" in registry and "b" not in registry
    with pytest.raises(UnknownNameError, match=r"unknown widget 'b'; allowed: a"):
        registry.get("b")


def test_taken_name_is_refused_unless_replaced():
    registry: Registry = Registry("widget", "sparsearch.test-widgets")
    registry.add("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        registry.add("a", 2)
    registry.add("a", 2, replace=True)
    assert registry.get("a") == 2
    with pytest.raises(ValueError, match="non-empty string name"):
        registry.add("", 3)


def test_resolve_reference_errors_name_the_reference():
    assert resolve_reference("math:sqrt", what="model")(4.0) == 2.0
    with pytest.raises(ValueError, match=r"model 'math' is not of the form"):
        resolve_reference("math", what="model")
    with pytest.raises(ValueError, match=r"dataset 'no_such_module_xyz:f': cannot import module"):
        resolve_reference("no_such_module_xyz:f", what="dataset")
    with pytest.raises(ValueError, match=r"has no attribute 'nope'"):
        resolve_reference("math:nope", what="model")


def test_a_registered_distribution_is_taken_by_a_sparsifier_and_an_unknown_one_lists_it():
    import torch
    from torch import nn

    from sparsearch.engine import Sparsifier
    from sparsearch.sparsity.distribution import DISTRIBUTIONS

    @DISTRIBUTIONS.register("wider-keeps-more")
    def wider_keeps_more(shape) -> float:
        return float(shape[0])  # relative density grows with the number of outputs

    try:
        model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
        sparsifier = Sparsifier(0.8, distribution="wider-keeps-more")
        sparsifier.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
        density = {row.name: 1 - row.target_sparsity for row in sparsifier.report()}
        assert density["0.weight"] == pytest.approx(8 * density["2.weight"], rel=0.05)  # whole weights kept
        with pytest.raises(ValueError, match=r"unknown distribution 'nope'; allowed: .*wider-keeps-more.*global"):
            Sparsifier(0.8, distribution="nope")
    finally:
        DISTRIBUTIONS.remove("wider-keeps-more")
