"""lmms-eval's entry point for the ``solo`` model (setup.py: group ``lmms_eval.models``).

Kept apart from :mod:`.lmms_model` so that lmms-eval's registry, which loads every entry point at start-up,
imports nothing heavy: the model module (torch, transformers) is imported only when ``--model solo`` is used.
"""

from __future__ import annotations

MODEL_ID = "solo"
CLASS_PATH = "megatron.solo.evaluation.lmms_model.Solo"


def manifests():
    """The ``ModelManifest`` lmms-eval registers ``solo`` from."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)]
