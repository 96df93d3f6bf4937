"""README's "In ten lines" runs as written (its data paths taken from the repository, its export written
to a temporary folder), and does what its comments say."""

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_ten_lines_run(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## In ten lines\n\n```python\n(.*?)```", text, re.S).group(1)
    assert len(block.strip().splitlines()) <= 12
    code = block.replace('"data/', f'"{ROOT}/data/')
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own example
    lb = scope["lb"]
    assert scope["mlp"].dims == ("layer", "pos") and scope["attr"]["neuron"].dims == ("layer", "neuron")
    assert isinstance(scope["pruned"], lb.Mitigation) and len(scope["pruned"].edit.changes) == 1
    assert scope["nas"].top_heads(1) == [(2, 1)]  # the organism's planted negative head
    assert scope["lsdm"].report["abs_bias_after"] < scope["lsdm"].report["abs_bias_before"]
    assert (tmp_path / "organism-debiased" / "model.safetensors").exists()
    assert os.listdir(tmp_path) == ["organism-debiased"]
