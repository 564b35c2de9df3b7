"""Checkpoint conversion between Hugging Face (Mistral / SOLO) and megatron-core ``GPTModel`` weights.

* :mod:`.name_table` — the declarative HF ↔ Megatron name table and the pure state-dict converters
  (``hf_to_megatron``, ``megatron_to_hf``, ``model_config_from_hf``).
* :mod:`.hf_solo` — ``SoloConfig`` / ``SoloForCausalLM``, the HF model class (needs transformers).
* :mod:`.hf_export` — ``write_hf_export`` / ``read_hf_checkpoint``: HF directories on disk.

Only the name table is re-exported here (no transformers import).
"""

from megatron.solo.convert.name_table import ConversionError, hf_to_megatron, megatron_to_hf, model_config_from_hf

__all__ = ["ConversionError", "hf_to_megatron", "megatron_to_hf", "model_config_from_hf"]
