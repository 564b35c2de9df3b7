"""Checkpoint conversion between Hugging Face (Mistral / SOLO) and megatron-core ``GPTModel`` weights.

* :mod:`.name_table` — the declarative HF ↔ Megatron name table and the pure state-dict converters
  (``hf_to_megatron``, ``megatron_to_hf``, ``Arch``); needs only torch.
* :mod:`.hf_solo` — ``SoloConfig`` / ``SoloForCausalLM``, the HF model class (needs transformers).
* :mod:`.hf_export` — ``write_hf_export`` / ``read_hf_checkpoint``: HF directories on disk.

Importing this package is cheap; only the torch-only name table is re-exported here.
"""

from megatron.solo.convert.name_table import Arch, ConversionError, hf_to_megatron, megatron_to_hf

__all__ = ["Arch", "ConversionError", "hf_to_megatron", "megatron_to_hf"]
