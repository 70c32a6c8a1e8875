"""The README's Python quick start runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_sparse_training_quick_start_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    training = next(block for block in blocks if "sa.RigL" in block)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(training, "README.md", "exec"), namespace)
    sparsifier = namespace["sparsifier"]
    assert abs(sparsifier.overall_sparsity() - 0.9) < 1e-3
    assert (tmp_path / "model.safetensors").stat().st_size > 0
    for name, mask in sparsifier.masks.items():
        assert not sparsifier.params[name].detach()[~mask].any(), f"pruned weights of {name} are not zero"
