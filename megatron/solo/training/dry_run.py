"""``--dry-run``: every check that needs no process group, then the resolved configuration; no GPU needed."""

from __future__ import annotations

import os
import sys
from typing import TextIO

from megatron.solo.data.packed_format import output_files
from megatron.solo.training.arguments import TrainConfig, check_model, describe, resolve_layout
from megatron.solo.training.checkpoint import resolve_start


def dry_run(cfg: TrainConfig, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Validate ``cfg`` for ``--world-size`` (or ``$WORLD_SIZE``) ranks and print it; 0 when it would start.

    Data prefixes and checkpoints that do not exist on this machine are reported on ``err`` as warnings (a
    launcher is usually dry-run away from the cluster's storage); configuration errors raise ``ConfigError``.
    """
    world_size = cfg.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    layout = resolve_layout(cfg, world_size)
    start = resolve_start(cfg, allow_missing=True)
    check_model(cfg, start.model, start.padded_vocab_size)
    for _, prefix in cfg.blend:
        missing = [p for p in output_files(prefix) if not os.path.isfile(p)]
        if missing:
            print(f"warning: --data-path {prefix}: not found here ({os.path.basename(missing[0])} missing)", file=err)
    if cfg.distill_teacher is not None:
        from megatron.solo.training.stage1 import Stage1Teacher

        teacher_warning = Stage1Teacher.check(cfg, start.model, allow_missing=True)
        if teacher_warning:
            print(f"warning: {teacher_warning}", file=err)
    for warning in start.warnings:
        print(f"warning: {warning}", file=err)
    print("\n".join(describe(cfg, layout, start.model, start.padded_vocab_size)), file=out)
    if start.kind == "scratch" and cfg.load is not None:  # --load is not on this machine
        kind = "its weights" if cfg.finetune else "its weights (a release) or resume it (an iteration)"
        print(f"start: --load {cfg.load}: {kind}; not present here, architecture checked from --model-preset", file=out)
    else:
        print(f"start: {start.description}", file=out)
    return 0
