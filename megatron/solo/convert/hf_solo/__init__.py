"""SOLO's Hugging Face model (``SoloConfig``, ``SoloForCausalLM``) and processor, registered with the Auto classes.

Importing this package registers ``model_type="solo"`` with ``AutoConfig``/``AutoModelForCausalLM`` (so
exports load without ``trust_remote_code`` where solo-megatron is installed) and marks both classes for
``auto_map`` so ``save_pretrained``/``push_to_hub`` carry the code. The three modules themselves import only
torch, numpy, PIL and transformers: they are copied verbatim into every export (see ``hf_export``).
"""

from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor

from .configuration_solo import SoloConfig
from .modeling_solo import SoloBaseModel, SoloForCausalLM
from .processing_solo import MISTRAL_CHAT_TEMPLATE, SoloProcessor

MODELING_FILES = tuple(
    Path(__file__).with_name(n) for n in ("configuration_solo.py", "modeling_solo.py", "processing_solo.py")
)
"""The files an export carries as remote code."""

AUTO_MAP = {
    "AutoConfig": "configuration_solo.SoloConfig",
    "AutoModelForCausalLM": "modeling_solo.SoloForCausalLM",
    "AutoProcessor": "processing_solo.SoloProcessor",
}

SoloConfig.register_for_auto_class()
SoloForCausalLM.register_for_auto_class("AutoModelForCausalLM")
SoloProcessor.register_for_auto_class("AutoProcessor")
AutoConfig.register(SoloConfig.model_type, SoloConfig, exist_ok=True)
AutoModelForCausalLM.register(SoloConfig, SoloForCausalLM, exist_ok=True)
AutoProcessor.register(SoloConfig, SoloProcessor, exist_ok=True)

__all__ = [
    "AUTO_MAP",
    "MISTRAL_CHAT_TEMPLATE",
    "MODELING_FILES",
    "SoloBaseModel",
    "SoloConfig",
    "SoloForCausalLM",
    "SoloProcessor",
]
