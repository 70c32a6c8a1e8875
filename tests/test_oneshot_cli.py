"""`sparsearch prune` end to end on tiny saved models: output loads with transformers, source untouched."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from test_oneshot_support import make_tiny_bert, make_tiny_gpt2, single_torch_thread, stdlib_texts
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from sparsearch.cli import app
from sparsearch.oneshot.hf import REPORT_NAME

one_torch_thread = pytest.fixture(autouse=True, scope="module")(single_torch_thread)
runner = CliRunner()


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join(stdlib_texts()), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return make_tiny_gpt2(tmp_path_factory.mktemp("gpt2"), stdlib_texts())


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    directory = make_tiny_bert(tmp_path_factory.mktemp("bert"), stdlib_texts())
    (directory / "1_Pooling").mkdir()
    (directory / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    return directory


def _fingerprint(directory):
    return {
        path.relative_to(directory).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*")) if path.is_file()
    }


def test_prune_gpt2_writes_a_model_transformers_loads_and_a_report(gpt2_dir, calib_file, tmp_path):
    source_before = _fingerprint(gpt2_dir)
    out = tmp_path / "pruned"
    result = runner.invoke(app, [
        "prune", str(gpt2_dir), "--method", "wanda", "--sparsity", "0.6", "--calib", str(calib_file),
        "--out", str(out), "--calib-tokens", "1024", "--seq-len", "32",
    ])
    assert result.exit_code == 0, result.output
    assert _fingerprint(gpt2_dir) == source_before
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    pruned_weight = model.transformer.h[1].mlp.c_fc.weight
    assert (pruned_weight == 0).float().mean().item() == pytest.approx(0.6, abs=0.01)
    dense = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    assert torch.equal(model.transformer.wte.weight, dense.transformer.wte.weight)
    ids = tokenizer("Return a list of the lines in the string.", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(input_ids=ids).logits).all()
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["method"] == "wanda" and report["calibration_tokens"] == 1024
    assert len(report["layers"]) == 8
    for layer in report["layers"]:
        assert layer["actual_sparsity"] == pytest.approx(0.6, abs=0.01)
        assert 0 < layer["reconstruction_error"] < 1 and layer["seconds"] >= 0
    assert f"sparsity {report['actual_sparsity']:.4f} of {report['pruned_parameters']} weights" in result.output


def test_prune_bert_with_sparsegpt_2_4_and_dsnot_keeps_the_auxiliary_files(bert_dir, calib_file, tmp_path):
    out = tmp_path / "pruned"
    report_path = tmp_path / "report.json"
    result = runner.invoke(app, [
        "prune", str(bert_dir), "--method", "sparsegpt", "--pattern", "2:4", "--dsnot", "--calib", str(calib_file),
        "--out", str(out), "--calib-tokens", "1024", "--report", str(report_path),
    ])
    assert result.exit_code == 0, result.output
    model = AutoModel.from_pretrained(out)
    weight = model.encoder.layer[0].intermediate.dense.weight
    assert ((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all()
    assert (out / "1_Pooling" / "config.json").is_file()
    report = json.loads(report_path.read_text())
    assert report["pattern"] == "2:4" and report["dsnot"] is True
    assert report["calibration_windows"] == 16  # 1024 tokens in windows of 64, the model's maximum


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--sparsity", "1.0"], "sparsity 1.0 is outside the allowed range [0, 1)"),
        (["--sparsity", "-0.2"], "sparsity -0.2 is outside the allowed range"),
        (["--pattern", "2:6"], "pattern 2:6 does not divide layer 'transformer.h.0.attn.c_attn'"),
        (["--pattern", "two:four"], "pattern 'two:four' is not N:M"),
        (["--method", "obs", "--sparsity", "0.5"], "method 'obs' is unknown; allowed: magnitude, wanda, sparsegpt"),
        (["--sparsity", "0.5", "--calib-tokens", "100000000"], "100000000 calibration tokens were asked for"),
        (["--sparsity", "0.5", "--seq-len", "65"], "sequence length 65 exceeds the model's maximum of 64"),
    ],
)
def test_bad_settings_fail_with_a_message_and_leave_no_output(arguments, message, gpt2_dir, calib_file, tmp_path):
    source_before = _fingerprint(gpt2_dir)
    out = tmp_path / "pruned"
    result = runner.invoke(app, ["prune", str(gpt2_dir), "--calib", str(calib_file), "--out", str(out), *arguments])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert not out.exists()
    assert _fingerprint(gpt2_dir) == source_before


def test_bad_paths_and_calibration_data_fail_with_a_message(gpt2_dir, calib_file, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("hello")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    cases = [
        ([str(tmp_path / "missing"), "--calib", str(calib_file)], "model directory", "does not exist"),
        ([str(not_a_model), "--calib", str(calib_file)], "is not a transformers model directory", "config.json"),
        ([str(gpt2_dir), "--calib", str(empty)], "calibration data is empty", ""),
        ([str(gpt2_dir), "--calib", str(tmp_path / "nope.txt")], "calibration file", "does not exist"),
    ]
    for arguments, first, second in cases:
        result = runner.invoke(app, ["prune", *arguments, "--sparsity", "0.5", "--out", str(tmp_path / "out")])
        assert result.exit_code == 2, arguments
        assert first in result.output and second in result.output
        assert "Traceback" not in result.output
    inside = runner.invoke(app, ["prune", str(gpt2_dir), "--calib", str(calib_file), "--sparsity", "0.5",
                                 "--out", str(gpt2_dir / "pruned")])
    assert inside.exit_code == 2 and "source is never modified" in inside.output
    assert not (gpt2_dir / "pruned").exists()
    busy = runner.invoke(app, ["prune", str(gpt2_dir), "--calib", str(calib_file), "--sparsity", "0.5",
                               "--out", str(occupied)])
    assert busy.exit_code == 2 and "is not empty" in busy.output
    assert [path.name for path in occupied.iterdir()] == ["keep.txt"]
