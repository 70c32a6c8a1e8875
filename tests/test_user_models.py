"""A study of the user's own model and data: the worked example (a ResNet on Fashion-MNIST, from Python and
from a study file), data built from tensors and torch Datasets, entry-point plug-ins, and bad input."""

from __future__ import annotations

import functools
import json
import shutil
import sqlite3
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from sparsearch.algorithms import ARMS
from sparsearch.cli import app
from sparsearch.data import FASHION_MNIST_DIR, make_splits
from sparsearch.models import MODELS
from sparsearch.report import write_report
from sparsearch.search import SPACES, WeightSpace
from sparsearch.study import StudyStore, run_study

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
needs_fashion = pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(), reason="needs the Debian package dataset-fashion-mnist"
)


@pytest.fixture
def example_module(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import resnet_fashion

    return resnet_fashion


def _trials(store: Path) -> dict[str, dict]:
    with sqlite3.connect(store) as connection:
        connection.row_factory = sqlite3.Row
        return {row["key"]: dict(row) for row in connection.execute("SELECT * FROM trial")}


# --------------------------------------------------------------------------------- worked example
@needs_fashion
def test_resnet_example_from_python_resumes_and_reports(tmp_path, example_module):
    model = example_module.resnet
    data = functools.partial(example_module.fashion_subset, n_train=400, n_test=200)
    study = {
        "name": "resnet-python",
        "sparsities": [0.9],
        "arms": ["dense", "random-weight", "search-weight", "snip"],
        "seeds": [0],
        "budget": {"epochs": 1},
        "search": {"n_candidates": 2, "short_train_steps": 2},
    }
    store = tmp_path / "runs.sqlite"
    run = run_study(study, model=model, data=data, store_path=store, workers=1, show_progress=False)
    assert sorted(run.finished) == sorted(_trials(store)) and not run.failed
    trials = _trials(store)
    assert trials["dense/s0/seed0"]["weight_sparsity"] == 0.0
    for key in ("random-weight/s0.9/seed0", "search-weight/s0.9/seed0", "snip/s0.9/seed0"):
        assert trials[key]["weight_sparsity"] == pytest.approx(0.9, abs=2e-3)
    # BatchNorm parameters are not masked: the ResNet keeps them dense
    assert trials["snip/s0.9/seed0"]["params_nonzero"] > trials["snip/s0.9/seed0"]["params_total"] * 0.1
    with StudyStore(store) as opened:
        config = opened.study_config("resnet-python")
    assert config["model"] == "python:resnet_fashion:resnet"
    assert config["dataset"] == "python:resnet_fashion:fashion_subset(n_train=400, n_test=200)"

    again = run_study(study, model=model, data=data, store_path=store, workers=1, show_progress=False)
    assert again.finished == [] and again.already_done == 4
    report = write_report(store)
    assert {row.arm for row in report.rows} == {"dense", "random-weight", "search-weight", "snip"}


@needs_fashion
def test_resnet_example_from_a_study_file_that_names_it(tmp_path, monkeypatch):
    shutil.copy(EXAMPLES / "resnet_fashion.py", tmp_path / "resnet_fashion.py")
    (tmp_path / "study.toml").write_text(
        textwrap.dedent(
            """
            name = "resnet-file"
            model = "resnet_fashion:resnet"
            dataset = "resnet_fashion:fashion_quick"
            sparsities = [0.9]
            arms = ["dense", "rigl"]
            seeds = [0]
            [budget]
            epochs = 1
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "resnet_fashion", raising=False)
    result = CliRunner().invoke(app, ["study", "study.toml", "--workers", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    trials = _trials(tmp_path / "sparsearch-runs" / "resnet-file.sqlite")
    assert {key: row["status"] for key, row in trials.items()} == {"dense/s0/seed0": "done", "rigl/s0.9/seed0": "done"}
    assert "report:" in result.output


def test_the_readme_example_study_file_is_valid():
    from sparsearch.study import load_study_config

    sys.path.insert(0, str(EXAMPLES))
    try:
        config = load_study_config(EXAMPLES / "resnet_fashion.toml")
    finally:
        sys.path.remove(str(EXAMPLES))
    assert config.model == "resnet_fashion:resnet" and config.dataset == "resnet_fashion:fashion_subset"
    readme = (EXAMPLES.parent / "README.md").read_text()
    assert "examples/resnet_fashion.py" in readme and "resnet_fashion.toml" in readme


# ------------------------------------------------------------------------------ data from tensors
def small_mlp(seed: int) -> nn.Module:
    """A user's model at module level (so worker processes can import it)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 3))


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=generator)
    centres = torch.randn(3, 12, generator=torch.Generator().manual_seed(99)) * 3
    return centres[labels] + torch.randn(n, 12, generator=generator), labels


def test_data_from_tensors_and_datasets_on_a_process_pool(tmp_path):
    x_train, y_train = _blobs(600, 0)
    x_test, y_test = _blobs(200, 1)
    data = {"train": torch.utils.data.TensorDataset(x_train, y_train), "test": (x_test.numpy(), y_test.numpy())}
    study = {
        "name": "blobs",
        "sparsities": [0.8],
        "arms": ["dense", "random-weight", "search-weight", "rigl"],
        "seeds": [0],
        "budget": {"epochs": 3},
        "search": {"n_candidates": 2, "short_train_steps": 3},
    }
    run = run_study(study, model=small_mlp, data=data, store_path=tmp_path / "s.sqlite", workers=2, show_progress=False)
    assert len(run.finished) == 4 and not run.failed
    trials = _trials(tmp_path / "s.sqlite")
    assert trials["dense/s0/seed0"]["test_accuracy"] > 0.9  # separable blobs: the data reached the model intact
    with StudyStore(tmp_path / "s.sqlite") as store:
        assert store.study_config("blobs")["dataset"].startswith("tensors:")
    # other tensors under the same study name: refused, nothing changed
    other = {"train": _blobs(600, 5), "test": (x_test, y_test)}
    with pytest.raises(ValueError, match="already holds a different study named 'blobs'"):
        run_study(study, model=small_mlp, data=other, store_path=tmp_path / "s.sqlite", workers=1, show_progress=False)


def test_make_splits_carves_a_seeded_validation_split():
    x, y = _blobs(100, 0)
    first, again, other = (make_splits((x, y), (x[:10], y[:10]), seed=s) for s in (0, 0, 1))
    assert first.sizes() == {"train": 90, "val": 10, "test": 10} and first.num_classes == 3
    assert torch.equal(first.x_val, again.x_val) and not torch.equal(first.x_val, other.x_val)
    with pytest.raises(ValueError, match=r"custom: train split: 100 inputs but 99 labels"):
        make_splits((x, y[:-1]), (x, y))
    with pytest.raises(ValueError, match=r"labels must be integer class indices, got dtype torch.float32"):
        make_splits((x, y + 0.5), (x, y))
    with pytest.raises(ValueError, match=r"per-sample input shapes differ"):
        make_splits((x, y), (x[:, :5], y))


def test_a_model_that_cannot_be_pickled_is_refused_before_the_store(tmp_path):
    data = {"train": _blobs(100, 0), "test": _blobs(50, 1)}
    study = {"name": "lambda", "sparsities": [0.5], "arms": ["dense", "rigl"], "seeds": [0]}
    store = tmp_path / "s.sqlite"
    with pytest.raises(ValueError, match=r"cannot be sent to worker processes.*or run with workers=1"):
        run_study(study, model=lambda seed: small_mlp(seed), data=data, store_path=store, workers=2)
    assert not store.exists()


# ------------------------------------------------------------------------------- entry-point plug-ins
def test_an_installed_package_adds_an_arm_and_a_model_through_entry_points(tmp_path, monkeypatch):
    (tmp_path / "sparsearch_demo_plugin.py").write_text(
        textwrap.dedent(
            """
            from torch import nn
            from sparsearch.algorithms import StaticRandom

            def half_random(setting):
                return StaticRandom(setting.sparsity, distribution="uniform", seed=setting.seed)

            def tiny_mlp(input_shape, num_classes, widths=None):
                return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, num_classes))
            """
        )
    )
    dist_info = tmp_path / "sparsearch_demo_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: sparsearch-demo-plugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(
        "[sparsearch.arms]\ndemo-random = sparsearch_demo_plugin:half_random\n\n"
        "[sparsearch.models]\ndemo-mlp = sparsearch_demo_plugin:tiny_mlp\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for registry in (ARMS, MODELS):
        monkeypatch.setattr(registry, "_entry_points_loaded", False)
    try:
        study = {
            "name": "plugin",
            "dataset": "digits",
            "model": {"arch": "demo-mlp"},
            "sparsities": [0.7],
            "arms": ["demo-random"],
            "seeds": [0],
            "budget": {"epochs": 1},
        }
        run = run_study(study, store_path=tmp_path / "s.sqlite", workers=1, show_progress=False)
        assert run.finished == ["demo-random/s0.7/seed0"]
        trial = _trials(tmp_path / "s.sqlite")["demo-random/s0.7/seed0"]
        assert trial["weight_sparsity"] == pytest.approx(0.7, abs=1e-3)
        assert trial["params_total"] == 64 * 16 + 16 + 16 * 10 + 10  # the plug-in's model was trained
    finally:
        ARMS.remove("demo-random")
        MODELS.remove("demo-mlp")


def test_space_notes_are_stored_and_reported(tmp_path):
    class NotedSpace(WeightSpace):
        notes = ("layer '0' kept whole: it is only an example note",)

    SPACES.add("noted", lambda model, sparsity, *, distribution="erk": NotedSpace(model, sparsity, distribution))
    try:
        study = {"name": "noted", "dataset": "digits", "model": {"arch": "mlp", "widths": [16]},
                 "sparsities": [0.5], "arms": ["random-noted"], "seeds": [0], "budget": {"epochs": 1}}
        run_study(study, store_path=tmp_path / "s.sqlite", workers=1, show_progress=False)
    finally:
        SPACES.remove("noted")
    report = write_report(tmp_path / "s.sqlite")
    assert report.notes == {"random-noted": ["layer '0' kept whole: it is only an example note"]}
    assert "layer &#x27;0&#x27; kept whole" in report.files.html.read_text()
    assert "random-noted: layer '0' kept whole" in report.files.markdown.read_text()
    trial = json.loads(report.files.json.read_text())["trials"][0]
    assert trial["notes"] == ["layer '0' kept whole: it is only an example note"]


# ---------------------------------------------------------------------------------------- bad input
BAD_INPUTS = '''
import torch
from torch import nn

def not_a_model(seed):
    return 42

class Peek(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :10]

def nothing_to_mask(seed):
    return Peek()

def wrong_input_size(seed):
    return nn.Sequential(nn.Flatten(), nn.Linear(100, 10))

def three_classes(seed):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))

def raises(seed):
    raise RuntimeError("no GPU here")

def not_data(seed):
    return [1, 2, 3]

def float_labels(seed):
    x = torch.randn(20, 64)
    return {"train": (x, torch.rand(20)), "test": (x, torch.rand(20))}

def ok_model(seed):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
'''


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ('model = "no_such_module_abc:make"', "model 'no_such_module_abc:make': cannot import module"),
        ('model = "user_code:missing"', "module 'user_code' has no attribute 'missing'"),
        ('model = "user_code:not_a_model"', "model 'user_code:not_a_model' returned int, expected a torch.nn.Module"),
        ('model = "user_code:raises"', "model 'user_code:raises' raised RuntimeError when called with seed=0"),
        ('model = "user_code:nothing_to_mask"', "(Peek) has nothing to mask"),
        ('model = "user_code:wrong_input_size"', "dataset 'digits' does not fit model 'user_code:wrong_input_size'"),
        ('model = "user_code:three_classes"', "the labels go up to 9 (10 classes) but the model returns 3 scores"),
        ('model = "mlp"', "model 'mlp' is neither a [model] table nor"),
        ('model = "user_code:ok_model"\ndataset = "user_code:not_data"', "must be a sparsearch.data.DataSplits"),
        ('model = "user_code:ok_model"\ndataset = "user_code:float_labels"', "labels must be integer class indices"),
        ('dataset = "user_code:nope"', "module 'user_code' has no attribute 'nope'"),
        ('model = "user_code:ok_model"\narms = ["search-node"]', "arm 'search-node' cannot run on model"),
    ],
)
def test_bad_user_code_exits_2_and_writes_nothing(tmp_path, monkeypatch, lines, message):
    (tmp_path / "user_code.py").write_text(BAD_INPUTS)
    dataset = "" if "dataset" in lines else 'dataset = "digits"\n'
    arms = "" if "arms" in lines else 'arms = ["dense", "rigl"]\n'
    (tmp_path / "study.toml").write_text(f'name = "bad"\n{dataset}{arms}sparsities = [0.5]\nseeds = [0]\n{lines}\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "user_code", raising=False)
    result = CliRunner().invoke(app, ["study", "study.toml", "--workers", "1", "--no-progress"])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "sparsearch-runs").exists()


# ------------------------------------------------------------- weight space on a model that is not ours
class TiedAttention(nn.Module):
    """Token ids -> embedding -> nn.MultiheadAttention -> Linear -> a head tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(17, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, 17, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.long())
        h, _ = self.attn(h, h, h)
        return self.head(torch.relu(self.mix(h)).mean(1))


def tied_attention(seed: int) -> nn.Module:
    return TiedAttention()


@pytest.mark.parametrize("scorer", ["short-train", "synflow"])
def test_weight_space_arms_run_on_attention_with_a_tied_head(tmp_path, scorer):
    tokens = torch.randint(0, 17, (300, 6), generator=torch.Generator().manual_seed(0))
    data = {"train": (tokens[:200].float(), tokens[:200, 0]), "test": (tokens[200:].float(), tokens[200:, 0])}
    study = {"name": "tied", "sparsities": [0.5], "arms": ["random-weight", "search-weight"], "seeds": [0],
             "budget": {"epochs": 1}, "search": {"n_candidates": 2, "short_train_steps": 2, "scorer": scorer}}
    run = run_study(study, model=tied_attention, data=data, store_path=tmp_path / "s.sqlite", workers=1,
                    show_progress=False)
    assert not run.failed, run.failed
    for trial in _trials(tmp_path / "s.sqlite").values():
        # masked: attn.out_proj, mix and the tied head (the embedding's tensor), half of them zero
        assert trial["weight_sparsity"] == pytest.approx(0.5, abs=1e-3)
