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


def test_importing_and_joining_a_world_patch_nothing_behind_the_callers_back():
    """Only an entry point's explicit install_cpu_backend_if_needed() touches torch.cuda and megatron-core."""
    code = (
        "import pkgutil, importlib, torch, megatron.solo\n"
        "from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer as DO\n"
        "before = (torch.cuda.current_device, DO.load_state_dict, DO._set_main_param_and_optimizer_states)\n"
        "for m in pkgutil.walk_packages(megatron.solo.__path__, 'megatron.solo.'):\n"
        "    importlib.import_module(m.name)\n"
        "after = (torch.cuda.current_device, DO.load_state_dict, DO._set_main_param_and_optimizer_states)\n"
        "assert before == after, 'an import patched torch.cuda or megatron-core'\n"
        "from megatron.solo.parallel import init_distributed\n"
        "try:\n"
        "    init_distributed()\n"
        "except RuntimeError as err:\n"
        "    assert 'install_cpu_backend_if_needed' in str(err), err\n"
        "else:\n"
        "    raise AssertionError('joined a world on CPU without the CPU backend')\n"
        "assert torch.cuda.current_device is before[0]\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
