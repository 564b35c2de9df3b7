#!/usr/bin/env python
"""Score a checkpoint on benchmarks through lmms-eval: results.json and a Markdown table.

    python tools/evaluate.py --load CKPT [--iteration N] --tasks mmstar,mme,seedbench,ai2d,scienceqa_img \
        [--limit N] [--include-path DIR] [--template mistral|none|solo7b] [--batch-size 8] --output DIR

``--load`` is a Megatron checkpoint (converted to a temporary HF export, removed afterwards) or an HF export.
Runs ``python -m lmms_eval --model solo …`` (the command is printed and logged) and writes, in ``--output``:
``results.json`` (one row per task, the command, lmms-eval's own results), ``results.md`` (the table, SOLO-7B's
reported figures beside ours where available), ``lmms_eval.log`` and lmms-eval's raw output
(``lmms_eval/run-*/``: results and per-sample logs, a fresh folder per run). A run that leaves no results for
every requested task failed (lmms-eval 0.7.3 exits 0 after most errors): exit 1, naming the log, and an earlier
``results.json``/``results.md`` in ``--output`` stays as it was. SIGTERM/SIGHUP stop lmms-eval and remove the
temporary export. Needs the eval install (README, "Evaluation").
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True, type=Path, help="Megatron checkpoint directory or HF export")
    p.add_argument("--iteration", type=int, default=None, help="Megatron checkpoint iteration (default: latest)")
    p.add_argument("--tasks", required=True, help="comma-separated lmms-eval tasks")
    p.add_argument("--limit", type=int, default=None, help="first N samples of each task (for testing)")
    p.add_argument("--include-path", type=Path, default=None, help="extra lmms-eval task directory")
    p.add_argument(
        "--template",
        choices=("mistral", "none", "solo7b"),
        default="mistral",
        help="mistral: [INST] … [/INST] (instruction-tuned); none: the pretraining format; solo7b: the released "
        "SOLO-7B's layout (images, then <s>[INST] … [/INST], images closed by <vision>)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="more --model_args for the solo model (e.g. image_end_token=<vision>)",
    )
    p.add_argument("--offline", action="store_true", help="datasets from local files only (HF_*_OFFLINE)")
    p.add_argument("--output", required=True, type=Path)
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit must be ≥ 1, got {args.limit}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be ≥ 1, got {args.batch_size}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron.solo.evaluation.pipeline import exit_on_termination

    with exit_on_termination():  # SIGTERM/SIGHUP → SystemExit(143): the child is killed, the export removed
        return evaluate(args)


def evaluate(args: argparse.Namespace) -> int:
    from megatron.solo.evaluation.pipeline import (
        EvaluationSetupError,
        check_environment,
        fresh_run_dir,
        hf_model_dir,
        installed_lmms_eval_version,
        is_hf_export,
        is_megatron_checkpoint,
        lmms_command,
        run_lmms,
        scored_iteration,
    )
    from megatron.solo.evaluation.results import MissingResultsError, markdown, read_lmms_results, rows, summary
    from megatron.solo.io import write_atomic

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.output.mkdir(parents=True, exist_ok=True)
    log = args.output / "lmms_eval.log"
    iteration = args.iteration
    try:
        check_environment()
        if is_megatron_checkpoint(args.load) and not is_hf_export(args.load):
            iteration = scored_iteration(args.load, args.iteration)  # the one scored, for the report
        with hf_model_dir(args.load, args.iteration, work_dir=args.output) as model_dir:
            raw = fresh_run_dir(args.output / "lmms_eval")
            cmd = lmms_command(
                model_dir,
                tasks,
                raw,
                template=args.template,
                batch_size=args.batch_size,
                limit=args.limit,
                include_path=args.include_path,
                device=args.device,
                extra_model_args=args.model_arg,
            )
            print("evaluate:", shlex.join(cmd), flush=True)
            run_lmms(cmd, log, offline=args.offline)
        lmms, samples = read_lmms_results(raw, tasks)
    except EvaluationSetupError as e:
        print(f"evaluate.py: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"evaluate.py: lmms-eval failed (exit {e.returncode}); see {log}", file=sys.stderr)
        return 1
    except MissingResultsError as e:
        print(f"evaluate.py: lmms-eval failed ({e}); see {log}", file=sys.stderr)
        return 1
    table = rows(lmms)
    title = f"{args.load}" + (f" (iteration {iteration})" if iteration is not None else "")
    report = {
        "checkpoint": str(args.load),
        "iteration": iteration,
        "tasks": tasks,
        "limit": args.limit,
        "template": args.template,
        "lmms_eval_version": installed_lmms_eval_version(),
        "lmms_eval_git": lmms.get("lmms_eval_version"),  # lmms-eval's own field: the git branch@commit of its cwd
        "command": cmd,
        "rows": summary(table),
        "samples": [str(p) for p in samples],
        "lmms_eval": {k: lmms[k] for k in ("results", "group_subtasks", "n-samples", "higher_is_better") if k in lmms},
    }
    write_atomic(args.output / "results.json", json.dumps(report, indent=2) + "\n")
    md = markdown(table, title)
    write_atomic(args.output / "results.md", md)
    print("\n" + md + f"\nwritten: {args.output / 'results.json'}, {args.output / 'results.md'}")
    return 0


if __name__ == "__main__":  # required: loading a checkpoint may spawn helper processes
    sys.exit(main())
