"""SOLO's Hugging Face model (``SoloConfig``, ``SoloForCausalLM``), registered with the Auto classes.

Importing this package registers ``model_type="solo"`` with ``AutoConfig``/``AutoModelForCausalLM`` (so
exports load without ``trust_remote_code`` where solo-megatron is installed) and marks both classes for
``auto_map`` so ``save_pretrained``/``push_to_hub`` carry the code. The two modules themselves import only
torch and transformers: they are copied verbatim into every export (see ``hf_export``).
"""

from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_solo import SoloConfig
from .modeling_solo import SoloBaseModel, SoloForCausalLM

MODELING_FILES = tuple(Path(__file__).with_name(n) for n in ("configuration_solo.py", "modeling_solo.py"))
"""The files an export carries as remote code."""

AUTO_MAP = {
    "AutoConfig": "configuration_solo.SoloConfig",
    "AutoModelForCausalLM": "modeling_solo.SoloForCausalLM",
}

SoloConfig.register_for_auto_class()
SoloForCausalLM.register_for_auto_class("AutoModelForCausalLM")
AutoConfig.register(SoloConfig.model_type, SoloConfig, exist_ok=True)
AutoModelForCausalLM.register(SoloConfig, SoloForCausalLM, exist_ok=True)

__all__ = ["AUTO_MAP", "MODELING_FILES", "SoloBaseModel", "SoloConfig", "SoloForCausalLM"]
