"""The evaluation's setup: the environment check, the lmms-eval command, the pinned version everywhere, the
entry point, and the local task's data (what the demo's generator makes)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_checkpoint import TASKS

from megatron.solo.evaluation import LMMS_EVAL_VERSION
from megatron.solo.evaluation.pipeline import (
    EvaluationSetupError,
    check_environment,
    hf_model_dir,
    lmms_command,
    scored_iteration,
)

ROOT = Path(__file__).resolve().parents[2]


def test_a_torchvision_that_does_not_load_is_named_with_its_fix(tmp_path, monkeypatch):
    """PyPI's CUDA torchvision beside the CPU torch fails at import like this; transformers would then fail."""
    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise OSError("libc10_cuda.so: cannot open shared object file")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with pytest.raises(EvaluationSetupError, match=r"libc10_cuda\.so.*pip uninstall -y torchvision"):
        check_environment()


def test_the_environment_of_these_tests_passes_the_check():
    check_environment()  # lmms-eval installed, no broken torchvision: what .ci/run sets up


def test_lmms_command(tmp_path):
    cmd = lmms_command(tmp_path, ["mme", "ai2d"], tmp_path / "o", template="none", limit=5, include_path=tmp_path)
    assert cmd[:3] == [sys.executable, "-m", "lmms_eval"]
    assert cmd[cmd.index("--model") + 1] == "solo"
    assert cmd[cmd.index("--model_args") + 1] == f"pretrained={tmp_path.resolve()},template=none"
    assert cmd[cmd.index("--tasks") + 1] == "mme,ai2d" and cmd[cmd.index("--limit") + 1] == "5"
    with pytest.raises(EvaluationSetupError, match="commas"):
        lmms_command(tmp_path, ["mme"], tmp_path, extra_model_args=["a=1,b=2"])
    with pytest.raises(EvaluationSetupError, match="--tasks"):
        lmms_command(tmp_path, [], tmp_path)


def test_an_hf_export_is_used_in_place_and_iteration_is_refused_for_it(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "solo"}')
    with hf_model_dir(tmp_path) as d:
        assert d == tmp_path
    with pytest.raises(EvaluationSetupError, match="--iteration"):
        with hf_model_dir(tmp_path, iteration=3):
            pass
    (tmp_path / "config.json").write_text('{"model_type": "haplo"}')  # a HaploVL export: not what `solo` runs
    with pytest.raises(EvaluationSetupError, match="model_type 'haplo'; evaluation scores SOLO exports"):
        with hf_model_dir(tmp_path):
            pass


def test_the_pinned_lmms_eval_is_what_ci_and_the_readme_install():
    pin = f"lmms-eval=={LMMS_EVAL_VERSION}"
    assert pin in (ROOT / ".ci" / "run").read_text()
    assert pin in (ROOT / "README.md").read_text()
    from importlib.metadata import version

    assert version("lmms-eval") == LMMS_EVAL_VERSION


def test_the_entry_point_registers_solo_with_lmms_eval():
    from lmms_eval.models import get_model

    from megatron.solo.evaluation.lmms_model import Solo

    assert get_model("solo") is Solo


def test_the_committed_task_data_is_what_the_generator_makes(tmp_path):
    from megatron.solo.demo.lmms_task import write_task_data

    data = TASKS / "solo_shapes" / "data"
    assert write_task_data(tmp_path / "d") == {"labels": 120, "questions": 96}
    for name in ("labels.jsonl", "questions.jsonl"):
        assert (tmp_path / "d" / name).read_text() == (data / name).read_text()
    rows = [
        json.loads(line) for f in ("labels.jsonl", "questions.jsonl") for line in (data / f).read_text().splitlines()
    ]
    for image in sorted({r["image"] for r in rows}):
        assert np.array_equal(np.asarray(Image.open(data / image)), np.asarray(Image.open(tmp_path / "d" / image)))
    assert sorted(p.relative_to(data).as_posix() for p in data.rglob("*.png")) == sorted({r["image"] for r in rows})


def test_the_label_images_are_the_demos_heldout_images(tmp_path):
    """So the demo's label score and lmms-eval's are about the same pictures: image k of class i from the same seed."""
    from megatron.solo.demo.data import DemoDataConfig, write_demo_data

    write_demo_data(
        tmp_path / "raw",
        DemoDataConfig(
            per_class=1,
            heldout_per_class=2,
            captions=1,
            heldout_captions=1,
            text_documents=1,
            sft_chats=1,
            sft_heldout=1,
        ),
        workers=1,
    )
    demo = [json.loads(line) for line in (tmp_path / "raw" / "labels" / "heldout.jsonl").read_text().splitlines()]
    task = [json.loads(line) for line in (TASKS / "solo_shapes" / "data" / "labels.jsonl").read_text().splitlines()]
    assert sorted(r["label"] for r in demo) == sorted(r["label"] for r in task[:30])
    by_name = {Path(r["image"]).name: r for r in task}
    for r in demo:
        mine = by_name[Path(r["image"]).name]
        assert mine["label"] == r["label"]
        a = np.asarray(Image.open(tmp_path / "raw" / "labels" / r["image"]))
        assert np.array_equal(a, np.asarray(Image.open(TASKS / "solo_shapes" / "data" / mine["image"])))


def fake_lmms_eval_version(root: Path, version: str) -> None:
    """An installed-package record of another lmms-eval release, first on sys.path."""
    info = root / f"lmms_eval-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: lmms-eval\nVersion: {version}\n")


def test_another_lmms_eval_release_is_refused_naming_the_pin(tmp_path, monkeypatch):
    fake_lmms_eval_version(tmp_path, "0.8.0")
    monkeypatch.syspath_prepend(str(tmp_path))
    fix = rf"lmms-eval 0\.8\.0 is installed.*pip install --no-deps lmms-eval=={LMMS_EVAL_VERSION}"
    with pytest.raises(EvaluationSetupError, match=fix):
        check_environment()
    from megatron.solo.evaluation.lmms_model import Solo

    with pytest.raises(EvaluationSetupError, match=fix):
        Solo(pretrained=str(tmp_path))  # before anything is loaded


def test_the_iteration_scored_and_what_cannot_be_scored(tiny_megatron, tmp_path, capsys):
    assert scored_iteration(tiny_megatron, None) == 3 and scored_iteration(tiny_megatron, 3) == 3
    with pytest.raises(EvaluationSetupError, match=r"no iter_0000007 \(--iteration 7; .*iter_0000003"):
        scored_iteration(tiny_megatron, 7)
    with pytest.raises(EvaluationSetupError, match=f"pass --load {tiny_megatron} --iteration N"):
        with hf_model_dir(tiny_megatron / "iter_0000003"):
            pass

    from megatron.solo.checkpointing import CheckpointMetadata
    from megatron.solo.families import get_preset

    haplo = tmp_path / "haplo"
    (haplo / "iter_0000001").mkdir(parents=True)
    (haplo / "latest_checkpointed_iteration.txt").write_text("1")
    cfg = get_preset("haplo-tiny")
    CheckpointMetadata(cfg, cfg.padded_vocab_size()).write(haplo)
    with pytest.raises(EvaluationSetupError, match="a haplo checkpoint; evaluation scores SOLO checkpoints only"):
        scored_iteration(haplo, None)

    sys.path.insert(0, str(ROOT / "tools"))
    import evaluate

    for load, iteration in ((tiny_megatron, ["--iteration", "7"]), (tiny_megatron / "iter_0000003", []), (haplo, [])):
        argv = ["--load", str(load), *iteration, "--tasks", "mme", "--output", str(tmp_path / "o")]
        assert evaluate.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("evaluate.py: ") and err.count("\n") == 1  # one line, no traceback


FAKE_LMMS_EVAL = """
import os, time
print(f"fake lmms-eval pid {os.getpid()}", flush=True)
time.sleep(300)
"""


@pytest.mark.timeout(180)
def test_sigterm_stops_lmms_eval_and_removes_the_temporary_export(tiny_megatron, tmp_path):
    """The child is a stand-in for lmms-eval that only waits (python -m lmms_eval finds it first on PYTHONPATH):
    SIGTERM to tools/evaluate.py while it runs ends both, and the export in --output is gone."""
    fake = tmp_path / "fake" / "lmms_eval"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text(textwrap.dedent(FAKE_LMMS_EVAL))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(fake.parent), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "tools" / "evaluate.py"), "--load", str(tiny_megatron), "--tasks", "x"]
    proc = subprocess.Popen(
        [*cmd, "--output", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    child = None
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("fake lmms-eval pid "):
                child = int(line.split()[-1])
                break
        assert child is not None, "".join(lines[-30:])
        assert [p for p in out.iterdir() if p.name.startswith("solo-eval-export-")]  # the export, meanwhile
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
        with pytest.raises(ProcessLookupError):
            os.kill(child, 0)
        child = None
        assert not [p for p in out.iterdir() if p.name.startswith("solo-eval-export-")]
        assert not (out / "results.json").exists()
    finally:
        for pid in (proc.pid, child):
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        proc.wait(timeout=30)
