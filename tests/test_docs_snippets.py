"""Every ```python block of README.md and docs/*.md runs as written on this machine (a
block that needs several GPUs says so in its first line, "# Under torchrun", and is
skipped): a snippet a user copies must not fail for a missing import or a stale name."""

import os
import re
import subprocess
import sys

import pytest

from tests._paths import ROOT

BLOCKS = [(f"{path.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}", m.group(1))
          for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
          for text in [path.read_text()]
          for m in re.finditer(r"```python\n(.*?)```", text, re.S)]


def test_the_docs_hold_runnable_snippets():
    assert sum(not code.startswith("# Under torchrun") for _, code in BLOCKS) >= 2, BLOCKS


@pytest.mark.parametrize("where, code", BLOCKS, ids=[w for w, _ in BLOCKS])
def test_doc_snippet_runs(where, code, tmp_path):
    if code.startswith("# Under torchrun"):
        pytest.skip(f"{where} needs torchrun and GPUs")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, f"{where}:\n{code}\n{done.stderr}"
