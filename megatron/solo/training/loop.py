"""The training loop (placeholder while it is written: only --dry-run works)."""

from __future__ import annotations

import sys
from typing import Sequence

from megatron.solo.training.arguments import ConfigError, parse_args


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        if cfg.dry_run:
            from megatron.solo.training.dry_run import dry_run

            return dry_run(cfg)
    except ConfigError as err:
        print(f"pretrain_solo.py: error: {err}", file=sys.stderr)
        return 2
    raise NotImplementedError("training")
