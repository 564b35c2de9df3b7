"""Benchmark evaluation through lmms-eval: the ``solo`` model on an HF export (:mod:`.lmms_model`, registered by
:mod:`.lmms_plugin`), the batched runner under it (:mod:`.hf_runner`) and the results table
(:mod:`.results`). Nothing here is imported by training; lmms-eval itself is an optional install (README)."""

LMMS_EVAL_VERSION = "0.7.3"
"""The lmms-eval release this is tested with; installed with --no-deps (README: Evaluation)."""
