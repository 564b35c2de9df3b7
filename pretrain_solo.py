"""Pre-train a SOLO model: ``torchrun --nproc-per-node N pretrain_solo.py [Megatron-LM flags]``.

See ``examples/solo/`` for the paper's three stages and ``python pretrain_solo.py --help`` for every flag;
the logic lives in ``megatron/solo/training/``.
"""

import sys
import warnings

# On machines without them the fallback is expected; say it once in the docs, not on every launch.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

from megatron.solo.training.loop import main  # noqa: E402 (after the warning filter, on purpose)

if __name__ == "__main__":  # required: torch_dist checkpoint saving spawns helper processes
    sys.exit(main())
