"""The evaluation's setup: the environment check, the lmms-eval command, the pinned version everywhere, the
entry point, and the local task's data (what the demo's generator makes)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TASKS
from PIL import Image

from megatron.solo.evaluation import LMMS_EVAL_VERSION
from megatron.solo.evaluation.pipeline import EvaluationSetupError, check_environment, hf_model_dir, lmms_command

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
    (tmp_path / "config.json").write_text("{}")
    with hf_model_dir(tmp_path) as d:
        assert d == tmp_path
    with pytest.raises(EvaluationSetupError, match="--iteration"):
        with hf_model_dir(tmp_path, iteration=3):
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
