"""The README's Python examples and the docstring examples run as written."""

import doctest
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Blocks preceded by an HTML comment starting "not run by tests" are skipped (each says why).
README_BLOCKS = [code for marker, code in re.findall(r"(<!-- not run by tests[^>]*-->\n)?```python\n(.*?)```",
                                                     (ROOT / "README.md").read_text(), flags=re.S) if not marker]


def test_readme_has_examples():
    assert len(README_BLOCKS) >= 4


@pytest.mark.parametrize("code", README_BLOCKS, ids=[f"readme-block-{i}" for i in range(len(README_BLOCKS))])
def test_readme_block_runs(code, monkeypatch):
    monkeypatch.chdir(ROOT)
    namespace = {}
    exec(compile("import torch\n" + code, "README.md", "exec"), namespace)


DOC_MODULES = ["sparseattn.index", "sparseattn.api", "sparseattn.bench.capture", "sparseattn.integrations.transformers", "sparseattn.config", "sparseattn.methods",
               "sparseattn.methods.xattention", "sparseattn.methods.flexprefill", "sparseattn.methods.minference",
               "sparseattn.methods.full", "sparseattn.reference.attention"]


@pytest.mark.parametrize("name", DOC_MODULES)
def test_docstring_examples(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    assert result.attempted > 0, f"{name} has no examples"
