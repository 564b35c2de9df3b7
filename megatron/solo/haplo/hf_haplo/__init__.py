"""HaploVL's Hugging Face model (``HaploConfig``, ``HaploForCausalLM``) in the released checkpoint layout.

Importing this package registers ``model_type="haplo"`` with ``AutoConfig``/``AutoModelForCausalLM`` and marks
both classes for ``auto_map``. The three modules import only torch, numpy, PIL and transformers: an export copies them
verbatim (:data:`MODELING_FILES`, :data:`AUTO_MAP`) so it loads with ``trust_remote_code=True`` anywhere.
"""

from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor

from .configuration_haplo import HaploConfig
from .modeling_haplo import HaploForCausalLM, HaploModel
from .processing_haplo import HaploProcessor

MODELING_FILES = tuple(
    Path(__file__).with_name(n) for n in ("configuration_haplo.py", "modeling_haplo.py", "processing_haplo.py")
)
"""The files an export carries as remote code."""

AUTO_MAP = {
    "AutoConfig": "configuration_haplo.HaploConfig",
    "AutoModelForCausalLM": "modeling_haplo.HaploForCausalLM",
    "AutoProcessor": "processing_haplo.HaploProcessor",
}

HaploConfig.register_for_auto_class()
HaploForCausalLM.register_for_auto_class("AutoModelForCausalLM")
HaploProcessor.register_for_auto_class("AutoProcessor")
AutoConfig.register(HaploConfig.model_type, HaploConfig, exist_ok=True)
AutoModelForCausalLM.register(HaploConfig, HaploForCausalLM, exist_ok=True)
AutoProcessor.register(HaploConfig, HaploProcessor, exist_ok=True)

__all__ = ["AUTO_MAP", "MODELING_FILES", "HaploConfig", "HaploForCausalLM", "HaploModel", "HaploProcessor"]
