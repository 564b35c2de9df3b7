"""HaploVL stage 1 in the trainer: the frozen vision teacher run in the training step, and the masks of the
positions it distils (the model side is ``megatron.solo.haplo.model``; the losses ``haplo/distill.py``)."""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import parallel_state

from megatron.solo.haplo.mask import NO_IMAGE
from megatron.solo.training.arguments import ConfigError, TrainConfig


class Stage1Teacher:
    """HaploVL stage 1's frozen vision teacher (a local HF CLIP directory), run in the training step on
    every image's whole tiles; its features are gathered at the sequence's patches. Under pipeline
    parallelism only the last stage (where the loss is) builds one; every rank runs :meth:`check`."""

    def __init__(self, cfg: TrainConfig, model):
        from megatron.solo.haplo.anyres import AnyresConfig
        from megatron.solo.haplo.distill import load_vision_teacher
        from megatron.solo.training.build import params_dtype

        # every rank ran check() (loop.py): the teacher's image size and layer fit the model and flags
        self.tiling = AnyresConfig(
            tile_size=model.tile_size,
            patch_size=model.patch_size,
            pinpoints=model.image_grid_pinpoints,
            anyres_max=model.anyres_max_tiles,
        )
        self.teacher = load_vision_teacher(cfg.distill_teacher, cfg.distill_teacher_layer, params_dtype(cfg))
        if torch.cuda.is_available():
            self.teacher.cuda(torch.cuda.current_device())
        self.hidden_size = self.teacher.hidden_size

    @staticmethod
    def check(cfg: TrainConfig, model, *, allow_missing: bool = False) -> str | None:
        """What every rank can check from the teacher's config.json alone (only the last pipeline stage loads
        the teacher: an error found there only would leave the other stages waiting in collectives).

        ``allow_missing`` (the dry run, often away from the cluster's storage): a directory that is not there
        is returned as a warning instead of raised."""
        if model.family != "haplo":
            raise ConfigError(f"--distill-teacher: HaploVL's stage 1; the model is {model.family}")
        if allow_missing and not Path(cfg.distill_teacher).exists():
            return f"--distill-teacher {cfg.distill_teacher}: not found here"
        teacher = teacher_config(cfg.distill_teacher)
        if teacher.image_size != model.tile_size:
            raise ConfigError(
                f"--distill-teacher: the teacher sees {teacher.image_size}-px images, the model's tiles are "
                f"{model.tile_size} px"
            )
        layers, layer = teacher.num_hidden_layers, cfg.distill_teacher_layer
        if not -(layers + 1) <= layer <= layers:
            raise ConfigError(
                f"--distill-teacher-layer: {layer} is outside the teacher's {layers} layers "
                f"(0..{layers}, or -{layers + 1}..-1: HF hidden_states indices)"
            )
        return None

    @staticmethod
    def masks(batch) -> tuple[torch.Tensor, torch.Tensor]:
        """float [b, s] ×2 on the host: the real text positions, and those plus every patch position."""
        b, s = batch.tokens.shape
        real = torch.arange(s)[None, :] < batch.pack_lengths[:, None]
        text = (real & (batch.image_block_ids == NO_IMAGE)).float()
        positions = text.clone()
        positions.view(-1)[batch.patch_index] = 1.0
        return text, positions

    def targets(self, batch) -> torch.Tensor:
        """[p, C]: the teacher's feature of each patch of ``batch`` (on the device, normalised)."""
        from megatron.solo.haplo.anyres import patches_to_tiles

        # tensor-parallel ranks hold the same batch: each runs the teacher on its share of the tiles
        group = parallel_state.get_tensor_model_parallel_group()
        features = self.teacher(patches_to_tiles(batch.tile_patches, self.tiling), group=group)  # [tiles, side², C]
        return features.reshape(-1, features.shape[-1]).index_select(0, batch.patch_tile_rows)


def teacher_config(directory: str):
    """The vision config of a local HF CLIP directory (``CLIPVisionModel``'s, or a full ``CLIPModel``'s
    ``vision_config``), read without loading any weight; ``ConfigError`` naming ``--distill-teacher``."""
    from transformers import CLIPVisionConfig

    root = Path(directory)
    if not root.is_dir():
        raise ConfigError(f"--distill-teacher: {directory} is not a directory")
    if not (root / "config.json").is_file():
        raise ConfigError(f"--distill-teacher: {directory} has no config.json (a local HF CLIP directory is needed)")
    try:
        return CLIPVisionConfig.from_pretrained(root, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:  # unreadable JSON, or not a CLIP config
        raise ConfigError(f"--distill-teacher: {root / 'config.json'} is not a CLIP config: {err}") from None
