"""solo-megatron: SOLO-style single-transformer vision-language pre-training on megatron-core.

This is a namespace portion beside ``megatron.core``: there is deliberately no ``megatron/__init__.py``.
Importing ``megatron.solo`` is cheap; submodules (``image``, ``tokenizer``, …) import their own dependencies.
"""

__version__ = "0.1.0"
