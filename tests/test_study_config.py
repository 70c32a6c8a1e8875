"""Study files: the embedded default, trial expansion, the config hash, and every bad input named clearly."""

from __future__ import annotations

import pytest

from sparsearch.study.config import (
    BASE_ARMS,
    default_study_config,
    load_study_config,
    parse_study_config,
)
from sparsearch.study.runner import expand_trials

MINIMAL = {"name": "t", "dataset": "digits", "sparsities": [0.5, 0.9]}


def test_default_study_is_the_random_search_baseline_on_mnist1d():
    config = default_study_config()
    assert config.dataset == "mnist1d"
    assert set(BASE_ARMS) <= set(config.arms)
    assert config.sparsities == (0.5, 0.8, 0.9, 0.95, 0.98)
    assert len(config.seeds) == 3
    trials = expand_trials(config)
    # dense once per seed, every other arm at every sparsity and seed
    assert len(trials) == 3 + 4 * 5 * 3
    assert len({t.key for t in trials}) == len(trials)
    assert [t.sparsity for t in trials if t.arm == "dense"] == [0.0, 0.0, 0.0]


def test_toml_file_round_trip(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(
        'name = "mine"\ndataset = "digits"\nsparsities = [0.9, 0.5]\narms = ["dense", "random-weight"]\n'
        'seeds = [4]\n[model]\narch = "mlp"\nwidths = [16]\n[budget]\nepochs = 2\n[search]\nn_candidates = 3\n'
    )
    config = load_study_config(path)
    assert config.sparsities == (0.5, 0.9)
    assert config.model.widths == (16,)
    assert config.budget.epochs == 2
    assert config.search.n_candidates == 3
    assert [t.key for t in expand_trials(config)] == [
        "dense/s0/seed4",
        "random-weight/s0.5/seed4",
        "random-weight/s0.9/seed4",
    ]


def test_config_hash_ignores_where_it_runs_but_not_what_it_computes():
    base = parse_study_config(MINIMAL)
    moved = parse_study_config({**MINIMAL, "store": "elsewhere.sqlite", "workers": 7})
    changed = parse_study_config({**MINIMAL, "sparsities": [0.5, 0.95]})
    assert base.config_hash() == moved.config_hash()
    assert base.config_hash() != changed.config_hash()
    assert str(base.store_path()) == "sparsearch-runs/t.sqlite"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"sparsities": [0.5, 1.0]}, ["sparsity 1.0 is outside [0, 1)"]),
        ({"sparsities": [-0.1]}, ["sparsity -0.1 is outside [0, 1)"]),
        ({"sparsities": []}, ["sparsities is empty"]),
        ({"sparsities": ["lots"]}, ["sparsities.0", "'lots'"]),
        ({"dataset": "cifar10"}, ["unknown dataset 'cifar10'", "mnist1d, fashion-mnist"]),
        ({"arms": ["dense", "lottery"]}, ["unknown arm 'lottery'", "allowed: dense, random-node"]),
        ({"arms": ["search-channel"]}, ["unknown search space 'channel'", "allowed spaces: node, weight"]),
        ({"arms": []}, ["arms is empty"]),
        ({"seeds": []}, ["seeds is empty"]),
        ({"colour": "red"}, ["unknown config key 'colour'", "allowed: name, dataset"]),
        ({"budget": {"epoch": 3}}, ["unknown config key 'epoch' in table 'budget'", "allowed: epochs, batch_size"]),
        ({"search": {"scorer": "vibes"}}, ["unknown scorer 'vibes'", "synflow"]),
        ({"model": {"arch": "resnet"}}, ["unknown model arch 'resnet'", "allowed: mlp, cnn"]),
        ({"budget": {"epochs": 0}}, ["budget.epochs", "greater than or equal to 1", "(got 0)"]),
        ({"executor": "slurm"}, ["executor", "'process' or 'ray'", "(got 'slurm')"]),
        ({"ray_address": "auto"}, ["ray_address is set but executor is 'process'"]),
    ],
)
def test_bad_study_files_name_the_value_and_what_is_allowed(change, expected):
    with pytest.raises(ValueError) as raised:
        parse_study_config({**MINIMAL, **change})
    message = str(raised.value)
    for fragment in expected:
        assert fragment in message


def test_every_problem_gets_its_own_line():
    with pytest.raises(ValueError) as raised:
        parse_study_config({**MINIMAL, "sparsities": [1.5], "dataset": "nope", "extra": 1})
    lines = str(raised.value).splitlines()
    assert len(lines) == 4  # the heading and one line per problem


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_study_config(tmp_path / "absent.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("name = \n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_study_config(broken)
