"""The README's Python snippet runs as written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from .idx_files import write_dataset

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_readme_python_snippet_runs(tmp_path):
    (snippet,) = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    # the snippet finds its data in $PYRO_VAE_DATA before Debian's folder: give it small real files
    write_dataset(tmp_path / "data", gz=True, n_train=256, n_test=32)
    env = {"PYRO_VAE_DATA": str(tmp_path / "data"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert re.search(r"ELBO of the last batch: -\d+\.\d nats per image", done.stdout)
    assert "posterior draws of z: (10, 128, 20)" in done.stdout
