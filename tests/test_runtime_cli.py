"""`sparsearch convert`: a pruned model file in, a sparse file out that loads back to the same outputs."""

import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from sparsearch.cli import app
from sparsearch.runtime import load_sparse, read_sparse_file

runner = CliRunner()


def pruned_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 400), nn.ReLU(), nn.Linear(400, 10))
    with torch.no_grad():
        model[0].weight.mul_(torch.rand(400, 300) > 0.95)
    return model


def test_convert_command_writes_a_loadable_sparse_file(tmp_path):
    model = pruned_mlp()
    source, target = tmp_path / "model.safetensors", tmp_path / "model.sparse.safetensors"
    save_file(model.state_dict(), str(source))
    # min-speedup tiny: store sparse whatever the timing, so the test does not depend on machine load
    result = runner.invoke(app, ["convert", str(source), "-o", str(target), "--batch-sizes", "1,8",
                                 "--min-speedup", "1e-9"])
    assert result.exit_code == 0, result.output
    assert "1 of 2 2-D weights stored sparse" in result.output  # layer 2 is dense: density above max_density
    _, matrices, _ = read_sparse_file(target)
    assert list(matrices) == ["0"]
    fresh = nn.Sequential(nn.Linear(300, 400), nn.ReLU(), nn.Linear(400, 10))
    loaded = load_sparse(target, fresh)
    x = torch.randn(4, 300)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)


def test_convert_command_reports_bad_input_without_traceback(tmp_path):
    result = runner.invoke(app, ["convert", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "does not exist" in result.output and "Traceback" not in result.output
    source = tmp_path / "model.safetensors"
    save_file(pruned_mlp().state_dict(), str(source))
    result = runner.invoke(app, ["convert", str(source), "-o", str(tmp_path / "o"), "--batch-sizes", "0,x"])
    assert result.exit_code == 2 and "--batch-sizes" in result.output
    source.write_bytes(b"not a safetensors file")
    result = runner.invoke(app, ["convert", str(source), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "not a readable safetensors file" in result.output


def test_int8_options_on_a_state_dict_file_are_refused_before_anything_is_written(tmp_path):
    source = tmp_path / "model.safetensors"
    save_file(pruned_mlp().state_dict(), str(source))
    for args, given in ((["--int8"], "--int8:"), (["--int8-activation-bits", "8"], "--int8-activation-bits 8:")):
        result = runner.invoke(app, ["convert", str(source), "-o", str(tmp_path / "never.safetensors"), *args])
        assert result.exit_code == 2 and given in result.output and "model directories" in result.output, \
            result.output
        assert not (tmp_path / "never.safetensors").exists()
