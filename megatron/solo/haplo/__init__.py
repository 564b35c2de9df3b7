"""HaploVL: a pre-decoder distilled from a frozen vision teacher, then the LLM (``haplovl_spec.md``)."""
