"""The package is a namespace portion beside megatron-core and installs its declared pieces."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_megatron_init_in_repo():
    assert not (ROOT / "megatron" / "__init__.py").exists(), "megatron/__init__.py would hide megatron.core"


def test_megatron_core_and_solo_import_side_by_side():
    code = (
        "import megatron, megatron.core, megatron.solo.image, megatron.solo.tokenizer\n"
        "from importlib.metadata import version\n"
        "assert version('megatron-core') == '0.16.1', version('megatron-core')\n"
        "paths = list(megatron.__path__)\n"
        "assert len(paths) >= 2, paths\n"
        "print(megatron.core.__file__)\n"
    )
    # A fresh interpreter outside the repo: what an installed user sees.
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "site-packages" in out.stdout or "dist-packages" in out.stdout
