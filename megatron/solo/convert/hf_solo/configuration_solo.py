"""SoloConfig: Mistral's hyper-parameters plus SOLO's pixel-patch input, under its own ``model_type``.

Self-contained (imports only transformers) so it can ship inside an exported checkpoint as remote code.
The reference declared ``model_type = "mistral"``, so Auto classes built a plain Mistral and silently
dropped the patch projection; ``"solo"`` makes a loader either get the real model or fail loudly.
Defaults are SOLO-7B's (Mistral-7B-v0.1 with SOLO's 33029-token vocabulary).
"""

from transformers import MistralConfig


class SoloConfig(MistralConfig):
    """``MistralConfig`` + ``vision_patch_size``; a patch is ``patch_dim = 3·P·P`` normalised pixels."""

    model_type = "solo"

    vocab_size: int = 33029
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 32768
    vision_patch_size: int = 32

    @property
    def patch_dim(self) -> int:
        """Length of one flattened RGB patch (3072 for 32×32)."""
        return 3 * self.vision_patch_size**2

    def __post_init__(self, **kwargs):
        # Checked here: the strict-dataclass validators are collected on MistralConfig, not on subclasses.
        size = self.vision_patch_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"SoloConfig.vision_patch_size must be a positive int, got {self.vision_patch_size!r}")
        super().__post_init__(**kwargs)


__all__ = ["SoloConfig"]
