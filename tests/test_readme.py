"""Every Python block of the README runs as written, in order, in one namespace (as a reader pastes them).

Blocks fenced as ```python fragment (excerpts of a script shown in full elsewhere) are not run.
"""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch, kernel_moves):
    blocks = python_blocks()
    assert any("sa.RigL" in block for block in blocks) and any("sa.runtime" in block for block in blocks)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(README.parent / "examples"))  # the worked example is "your own file"
    namespace: dict = {}
    for index, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {index + 1}", "exec"), namespace)
    sparsifier = namespace["sparsifier"]
    assert abs(sparsifier.overall_sparsity() - 0.9) < 1e-3
    assert (tmp_path / "model.safetensors").stat().st_size > 0
    for name, mask in sparsifier.masks.items():
        assert not sparsifier.params[name].detach()[~mask].any(), f"pruned weights of {name} are not zero"
    # the "Training on the sparse kernels" block: the sparse layers trained on the kernels, their patterns kept
    from sparsearch.runtime import SparseLinear

    trainable = namespace["trainable"]
    assert isinstance(trainable[1], SparseLinear) and trainable[1].trainable
    assert torch.equal(trainable[1].matrix.to_dense() != 0, namespace["model"][1].weight.detach() != 0)
    assert isinstance(trainable[3], torch.nn.Linear)  # the output layer: above max_density, as the README says
    # the KernelSwitch block: RigL trained its layers between updates on the kernels; after the block the model is
    # its own masked Linear layers again, pruned weights zero
    net, rigl = namespace["net"], namespace["rigl"]
    assert all(type(layer) in (torch.nn.Flatten, torch.nn.Linear, torch.nn.ReLU) for layer in net)
    assert rigl.updates >= 1 and abs(rigl.overall_sparsity() - 0.9) < 1e-3
    # onto the kernels at the start and after every update; ERK keeps layer "3" 34% dense, so it stays masked
    assert len(kernel_moves) == 1 + rigl.updates and all(layers == ["1"] for layers in kernel_moves)
    for name, mask in rigl.masks.items():
        assert not rigl.params[name].detach()[~mask].any(), f"pruned weights of {name} are not zero"
    # the "Ship" block: a converted model computing what the trained one computes, written to disk
    model, fast = namespace["model"], namespace["fast"]
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), atol=1e-5)
    assert (tmp_path / "model.sparse.safetensors").stat().st_size > 0
