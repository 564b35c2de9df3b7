"""The paper's stage launchers, the SLURM example and the Dockerfile, checked on a CPU machine.

Each launcher's ``--dry-run`` runs ``pretrain_solo.py --dry-run`` (about 5 s: it imports megatron-core), so
the launches are few: one per stage, one bad override, one simulated SLURM job.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron.solo.training.arguments import parse_args

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "solo"

# Reference spec §7.1, identical for the three stages (Megatron-LM argument names as the dry run prints them).
PAPER = {
    "tensor_model_parallel_size": "2",
    "sequence_parallel": "True",  # ours, not the paper's: the same maths, activation memory / TP
    "pipeline_model_parallel_size": "1",
    "world_size": "8",
    "data_parallel_size": "4",
    "use_distributed_optimizer": "True",
    "seq_length": "32768",
    "micro_batch_size": "1",
    "global_batch_size": "128",
    "num_microbatches": "32",
    "lr": "5e-05",
    "min_lr": "5e-06",
    "lr_decay_style": "cosine",
    "lr_warmup_iters": "200",
    "weight_decay": "0.1",
    "clip_grad": "1.0",
    "adam_beta1": "0.9",
    "adam_beta2": "0.999",
    "adam_eps": "1e-08",
    "bf16": "True",
    "transformer_impl": "transformer_engine",
    "recompute_granularity": "full",
    "recompute_method": "uniform",
    "recompute_num_layers": "4",
    "save_interval": "50",
    "log_interval": "1",
    "num_workers": "8",
    "model_preset": "mistral-7b",
}

# Reference spec §7.2: iterations, the blend (dataset → weight) and the chain of checkpoints.
STAGES = {
    "pretrain_stage1_imagenet21k.sh": {
        "train_iters": 1525,
        "load": "mistral-7b-solo",
        "save": "stage1",
        "finetune": False,
        "blend": {"imagenet21k": 0.70, "slimpajama_stage1": 0.30},
    },
    "pretrain_stage2_web.sh": {
        "train_iters": 3480,
        "load": "stage1",
        "save": "stage2",
        "finetune": True,
        "blend": {
            "capsfusion": 0.4604,
            "slimpajama_stage2": 0.2702,
            "websight": 0.1607,
            "cc3m": 0.0736,
            "detailed_captions": 0.0140,
            "llavar": 0.0081,
            "dvqa": 0.0065,
            "ocr_vqa": 0.0036,
            "figureqa": 0.0034,
        },
    },
    "pretrain_stage3_anneal.sh": {
        "train_iters": 300,
        "load": "stage2",
        "save": "stage3",
        "finetune": True,
        "blend": {
            "allava_laion": 0.3581,
            "slimpajama_stage3": 0.3153,
            "allava_vflan": 0.1166,
            "llavar": 0.0940,
            "dvqa": 0.0761,
            "figureqa": 0.0398,
        },
    },
}


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No launcher variable from the caller's environment; data and checkpoints in an empty directory."""
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "PYTHON": sys.executable,
        "DATA_ROOT": str(tmp_path / "data"),
        "CKPT_ROOT": str(tmp_path / "ckpt"),
    }
    env.update(extra)
    return env


def run(cmd: list[str], env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180)


def parse(stdout: str) -> tuple[dict[str, str], dict[str, str]]:
    """(the launcher's VAR=value lines, the trainer's name: value lines)."""
    shell, resolved = {}, {}
    for line in stdout.splitlines():
        if re.fullmatch(r"[A-Z_]+=.*", line):
            name, _, value = line.partition("=")
            shell[name] = value
        elif ": " in line:
            name, _, value = line.partition(": ")
            resolved.setdefault(name, value)
    return shell, resolved


def blend_of(data_path: str) -> dict[str, tuple[float, str]]:
    """dry-run ``data_path`` (normalised weights) → {dataset name: (weight, prefix)}."""
    words = data_path.split()
    return {Path(p).name: (float(w), p) for w, p in zip(words[0::2], words[1::2])}


def check_command_matches(command: str, resolved: dict[str, str], world_size: int) -> list[str]:
    """The torchrun line the launcher would run; its trainer flags must give exactly the dry run's config."""
    argv = shlex.split(command)
    assert argv[0] == "CUDA_DEVICE_MAX_CONNECTIONS=1" and argv[1] == "torchrun", argv[:2]
    script = next(i for i, a in enumerate(argv) if a.endswith("pretrain_solo.py"))
    assert Path(argv[script]) == ROOT / "pretrain_solo.py"
    cfg = parse_args([*argv[script + 1 :], "--dry-run", "--world-size", str(world_size)])
    for name, value in cfg.to_dict().items():
        if name not in ("data_path", "lr_decay_iters"):  # printed as the normalised blend; resolved
            assert resolved[name] == str(value), (name, resolved[name], value)
    printed = blend_of(resolved["data_path"])
    assert {Path(p).name: (pytest.approx(w, abs=1e-4), p) for w, p in cfg.blend} == printed
    return argv[2:script]


@pytest.mark.parametrize("launcher", sorted(STAGES))
def test_stage_dry_run_is_the_paper_recipe(launcher, tmp_path):
    stage = STAGES[launcher]
    proc = run(["bash", str(EXAMPLES / launcher), "--dry-run"], clean_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    shell, resolved = parse(proc.stdout)

    for name, value in PAPER.items():
        assert resolved[name] == value, (name, resolved[name], value)
    assert resolved["train_iters"] == str(stage["train_iters"])
    assert resolved["lr_decay_iters"] == str(stage["train_iters"])
    ckpt = tmp_path / "ckpt"
    assert resolved["load"] == str(ckpt / stage["load"])
    assert resolved["save"] == str(ckpt / stage["save"])
    assert resolved["finetune"] == str(stage["finetune"])
    assert resolved["tensorboard_dir"].startswith(str(ckpt))

    blend = blend_of(resolved["data_path"])
    total = sum(stage["blend"].values())
    assert set(blend) == set(stage["blend"])
    for name, (weight, prefix) in blend.items():
        assert weight == pytest.approx(stage["blend"][name] / total, abs=1e-4), name
        assert prefix == str(tmp_path / "data" / name)

    # Missing data and checkpoints are warnings here (the dry run is away from the cluster's storage).
    assert "warning: --load" in proc.stderr and "warning: --data-path" in proc.stderr
    assert shell["NNODES"] == "1" and shell["NODE_RANK"] == "0"
    launch = check_command_matches(resolved["command"], resolved, world_size=8)
    assert launch == [
        "--nnodes",
        "1",
        "--nproc-per-node",
        "8",
        "--node-rank",
        "0",
        "--master-addr",
        "localhost",
        "--master-port",
        "29500",
    ]


# The released SFT recipe (reference spec §8.3) as sft.sh translates it.
SFT_RECIPE = {
    "lr": "1e-05",
    "min_lr": "0.0",
    "lr_decay_style": "linear",
    "lr_warmup_iters": "6",
    "weight_decay": "0.05",
    "clip_grad": "1.0",
    "bf16": "True",
    "loss_averaging": "sample",
    "finetune": "True",
    "adam_beta1": "0.9",
    "adam_beta2": "0.999",
    "adam_eps": "1e-08",
    "seq_length": "32768",
    "tensor_model_parallel_size": "2",
    "data_parallel_size": "4",
    "micro_batch_size": "1",
}


@pytest.mark.parametrize("stats", [None, {"documents": 10_000, "packs": 800}])
def test_sft_dry_run_resolves_the_recipe(stats, tmp_path):
    """Without the prefix's stats: the documented defaults (16 samples per pack); with them: ≈ 512 samples per
    step as a whole number of micro-batches per DP rank, and one epoch of packs."""
    (tmp_path / "data").mkdir()
    if stats is not None:
        (tmp_path / "data" / "sft.stats.json").write_text(json.dumps(stats))
    proc = run(["bash", str(EXAMPLES / "sft.sh"), "--dry-run"], clean_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    shell, resolved = parse(proc.stdout)
    for name, value in SFT_RECIPE.items():
        assert resolved[name] == value, (name, resolved[name], value)
    # 12.5 samples per pack: 512 / 12.5 = 41 packs → 40 (a multiple of DP 4), 500 samples; 800 // 40 steps
    gbs, iters = (32, 2207) if stats is None else (40, 20)
    assert resolved["global_batch_size"] == str(gbs) and resolved["train_iters"] == str(iters)
    assert shell["SAMPLES_PER_PACK"] == ("16.00" if stats is None else "12.50")
    assert ("sft.stats.json not found" in proc.stderr) == (stats is None)
    ckpt = tmp_path / "ckpt"
    assert resolved["load"] == str(ckpt / "stage3") and resolved["save"] == str(ckpt / "sft")
    assert blend_of(resolved["data_path"]) == {"sft": (1.0, str(tmp_path / "data" / "sft"))}
    check_command_matches(resolved["command"], resolved, world_size=8)
    if stats is not None:  # the environment wins over the derived values
        overridden = run(
            ["bash", str(EXAMPLES / "sft.sh"), "--dry-run"],
            clean_env(tmp_path, GLOBAL_BATCH_SIZE="64", TRAIN_ITERS="50"),
        )
        assert overridden.returncode == 0, overridden.stderr
        assert parse(overridden.stdout)[1]["global_batch_size"] == "64"
        assert parse(overridden.stdout)[1]["train_iters"] == "50"


def test_sequence_parallel_follows_tensor_parallel_and_can_be_turned_off(tmp_path):
    launcher = str(EXAMPLES / "pretrain_stage1_imagenet21k.sh")
    for env, expected in ((dict(TP="1"), "False"), (dict(SEQUENCE_PARALLEL="0"), "False"), (dict(TP="4"), "True")):
        proc = run(["bash", launcher, "--dry-run"], clean_env(tmp_path, **env))
        assert proc.returncode == 0, proc.stderr
        assert parse(proc.stdout)[1]["sequence_parallel"] == expected, env


def test_bad_override_fails_naming_the_flag(tmp_path):
    proc = run(["bash", str(EXAMPLES / "pretrain_stage1_imagenet21k.sh"), "--dry-run"], clean_env(tmp_path, TP="3"))
    assert proc.returncode == 2
    assert "error: --tensor-model-parallel-size" in proc.stderr, proc.stderr


FAKE_SRUN = """#!/usr/bin/env bash
# Stands in for srun on one node: record the arguments, dry-run the launcher, then act as a trainer that
# saved iteration 50.
printf '%s\\n' "$@" > "$FAKE_LOG/srun.args"
while [[ $1 != bash ]]; do shift; done
bash "$2" --dry-run "${@:3}" > "$FAKE_LOG/dry_run.out" 2> "$FAKE_LOG/dry_run.err" || exit $?
mkdir -p "$SAVE" && echo 50 > "$SAVE/latest_checkpointed_iteration.txt"
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
case $1 in
    show) printf 'gpu-node-7\\ngpu-node-8\\ngpu-node-9\\ngpu-node-10\\n' ;;
    requeue) echo "$2" >> "$FAKE_LOG/requeued" ;;
esac
"""


def test_slurm_job_overrides_and_requeue(tmp_path):
    """The SLURM example with srun/scontrol faked: 4 nodes × 8, env and extra-arg overrides, requeue."""
    sbatch = EXAMPLES / "slurm_multinode.sbatch"
    assert run(["bash", "-n", str(sbatch)], clean_env(tmp_path)).returncode == 0

    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    data = tmp_path / "data"
    env = clean_env(
        tmp_path,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        FAKE_LOG=str(log),
        SLURM_JOB_ID="42",
        SLURM_NNODES="4",
        SLURM_NODEID="3",
        SLURM_JOB_NODELIST="gpu-node-[7-10]",
        SLURM_SUBMIT_DIR=str(ROOT),
        SLURM_JOB_END_TIME=str(int(time.time()) + 3600),
        STAGE="3",
        TP="4",
        DATA_PATH=f"2 {data}/mine_a 1 {data}/mine_b",
    )
    proc = run(["bash", str(sbatch), "--train-iters", "250", "--seed", "99"], env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr + (log / "dry_run.err").read_text()

    shell, resolved = parse((log / "dry_run.out").read_text())
    assert shell["MASTER_ADDR"] == "gpu-node-7" and shell["NODE_RANK"] == "3" and shell["NNODES"] == "4"
    assert resolved["world_size"] == "32"
    assert resolved["tensor_model_parallel_size"] == "4" and resolved["data_parallel_size"] == "8"
    assert resolved["sequence_parallel"] == "True"
    assert resolved["num_microbatches"] == "16"  # still 128 packs per step
    assert resolved["train_iters"] == "250" and resolved["seed"] == "99"
    assert 49 <= float(resolved["exit_duration_in_mins"]) <= 50  # the job's end time, minus 10 minutes
    assert blend_of(resolved["data_path"]) == {
        "mine_a": (pytest.approx(2 / 3, abs=1e-4), f"{data}/mine_a"),
        "mine_b": (pytest.approx(1 / 3, abs=1e-4), f"{data}/mine_b"),
    }
    assert resolved["load"] == str(tmp_path / "ckpt" / "stage2") and resolved["finetune"] == "True"
    assert resolved["save"] == str(tmp_path / "ckpt" / "stage3")
    launch = check_command_matches(resolved["command"], resolved, world_size=32)
    assert launch[:6] == ["--nnodes", "4", "--nproc-per-node", "8", "--node-rank", "3"]

    srun_args = (log / "srun.args").read_text().split("\n")
    assert str(EXAMPLES / "pretrain_stage3_anneal.sh") in srun_args
    # The checkpoint moved from none to 50 during the job: it requeues itself.
    assert (log / "requeued").read_text().split() == ["42"]


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split()[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_keeps_ngc_torch(tmp_path):
    instructions = dockerfile_instructions()
    args = dict(value.split("=", 1) for kind, value in instructions if kind == "ARG")
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", args["BASE_IMAGE"])
    assert instructions[[k for k, _ in instructions].index("FROM")][1] == "${BASE_IMAGE}"
    assert any(kind == "WORKDIR" for kind, _ in instructions)

    runs = [value for kind, value in instructions if kind == "RUN"]
    assert not any("PIP_CONSTRAINT" in r or "--upgrade" in r or " -U " in r for r in runs)
    pins = re.findall(r'"megatron-core(==[^"]+)"', (ROOT / "setup.py").read_text())
    installs = [cmd.strip() for r in runs for cmd in r.split("&&") if "pip install" in cmd]
    assert f"pip install --no-deps megatron-core{pins[0]}" in installs
    for cmd in installs:
        words = cmd.split()
        assert "--no-deps" in words or words[2:] == ["-r", "/tmp/requirements.txt", "wandb"], cmd
    torch_check = 'test "$(python -c \'import torch; print(torch.__version__)\')" = "$(cat /tmp/torch-version)"'
    for r in (r for r in runs if "pip install" in r):  # every RUN that installs checks torch afterwards
        assert r.rfind(torch_check) > r.rfind("pip install"), r

    # The requirements installed with their dependencies: setup.py's runtime + hf extra, never torch or
    # megatron-core. Run the Dockerfile's own filter on this setup.py's metadata.
    build = next(r for r in runs if "/tmp/requirements.txt" in r and "egg_info" in r)
    egg_info = next(c.strip() for c in build.split("&&") if "egg_info" in c)
    filter_cmd = next(c.strip() for c in build.split("&&") if c.strip().startswith("awk"))
    for name in ("setup.py", "README.md"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    subprocess.run(
        egg_info.replace("/tmp", str(tmp_path)).replace("python ", f"{sys.executable} ", 1).split(),
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=120,
    )
    subprocess.run(
        ["bash", "-o", "pipefail", "-c", filter_cmd.replace("/tmp", str(tmp_path))],
        cwd=tmp_path,
        check=True,
        timeout=60,
    )
    names = [re.split(r"[<>=!~;]", line)[0] for line in (tmp_path / "requirements.txt").read_text().split()]
    assert "torch" not in names and "megatron-core" not in names
    assert {"numpy", "sentencepiece", "transformers", "safetensors"} <= set(names)
    assert "pytest" not in names  # the test extra stays out of the image

    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "data", "checkpoints"} <= set(ignored)
