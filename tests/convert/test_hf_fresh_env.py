"""An export used from a fresh virtualenv where solo-megatron is not installed: AutoProcessor +
AutoModelForCausalLM (trust_remote_code) answer a batch of mixed prompts, as the package's own classes do.

The venv is new (``python -m venv --without-pip``, outside the repository, run with ``-I``: no PYTHONPATH, no
user site, cwd elsewhere). Its dependencies (torch, transformers, …) are those already installed here, made
visible by a ``.pth`` entry naming their directory: paths listed in a ``.pth`` are added to ``sys.path`` but
the ``.pth`` files inside them are not run, so the editable install's import hook for ``megatron.solo`` never
loads. Installing torch into a venv from the package index would cost minutes per test run; what is proven
here is the same: the export needs nothing from this repository.
"""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from tiny_models import random_mistral

from megatron.solo.convert.hf_export import write_hf_export
from megatron.solo.convert.hf_solo import SoloConfig

REPO = Path(__file__).resolve().parents[2]

CLIENT = textwrap.dedent("""
    import importlib.util, json, os, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoProcessor

    export_dir, photo, other = sys.argv[1:]
    report = {"prefix": sys.prefix, "solo_spec": importlib.util.find_spec("megatron.solo") is not None}
    processor = AutoProcessor.from_pretrained(export_dir, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True, dtype="auto").eval()
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": photo}, {"type": "text", "text": "What is it?"}]}],
        [{"role": "user", "content": "Two plus two is?"}],
        [{"role": "user", "content": [{"type": "image", "image": photo}, {"type": "image", "image": other},
                                      {"type": "text", "text": "What differs?"}]}],
    ]
    inputs = processor.apply_chat_template(conversations, tokenize=True).to(model.device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:]
    report.update(
        classes=[type(processor).__module__, type(model).__module__],
        ids=new.tolist(),
        answers=processor.batch_decode(new),
        prompt_ids=inputs["input_ids"].tolist(),
        solo_loaded=sorted(m for m in sys.modules if m.startswith("megatron.solo")),
    )
    print(json.dumps(report))
""")


def dependency_dirs() -> list[str]:
    """The site-packages directories that hold this environment's torch, transformers and their deps."""
    import numpy
    import PIL
    import safetensors
    import tokenizers
    import transformers

    modules = (torch, transformers, tokenizers, safetensors, numpy, PIL)
    return sorted({str(Path(m.__file__).resolve().parents[1]) for m in modules})


def test_export_answers_a_mixed_batch_in_a_fresh_venv_without_the_package(tokenizer, sample_photos, tmp_path):
    from transformers import AutoModelForCausalLM, AutoProcessor

    model = random_mistral(SoloConfig, vocab_size=tokenizer.vocab_size, vision_patch_size=32)
    export = write_hf_export(tmp_path / "made" / "solo", model.state_dict(), model.config, tokenizer, torch.float32)
    elsewhere = shutil.copytree(export, tmp_path / "elsewhere" / "solo")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()
    )
    assert not any(site.glob("*solo*")), "a fresh venv has no trace of this package"
    (site / "dependencies.pth").write_text("\n".join(dependency_dirs()) + "\n")
    (tmp_path / "client.py").write_text(CLIENT)
    photo, other = (str(shutil.copy(p, tmp_path / p.name)) for p in sample_photos[:2])
    env = {"PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [str(python), "-I", str(tmp_path / "client.py"), str(elsewhere), photo, other],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])

    assert Path(report["prefix"]) == venv and not report["solo_spec"] and report["solo_loaded"] == []
    assert all(m.startswith("transformers_modules.") for m in report["classes"])
    assert not str(elsewhere).startswith(str(REPO)) and not str(tmp_path).startswith(str(REPO))
    # The answers are those of the package's own classes on the same export, here.
    processor = AutoProcessor.from_pretrained(export)
    local = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": photo}, {"type": "text", "text": "What is it?"}]}],
        [{"role": "user", "content": "Two plus two is?"}],
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": photo},
                    {"type": "image", "image": other},
                    {"type": "text", "text": "What differs?"},
                ],
            }
        ],
    ]
    inputs = processor.apply_chat_template(conversations, tokenize=True)
    with torch.no_grad():
        want = local.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    assert report["prompt_ids"] == inputs["input_ids"].tolist()
    assert report["ids"] == want.tolist()
    assert report["answers"] == processor.batch_decode(want) and len(report["answers"]) == 3
