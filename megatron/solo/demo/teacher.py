"""The HaploVL miniature's vision teacher: a tiny HF ``CLIPVisionModel`` trained on the demo's label images.

HaploVL's stage 1 distils the pre-decoder from a frozen CLIP-ViT-L; the miniature cannot download one, so it
makes its own: a ``CLIPVisionModel`` at the model's tile size (haplo-tiny: 56-px tiles of 14-px patches),
trained briefly with a linear probe on its mean-pooled last-layer patch features predicting the label class
("red circle", 15 classes). The probe makes those patch features (what stage 1 distils, ``hidden_states[-1]``)
carry colour and shape. Each image is seen as one tile: the released anyres resize and letterbox onto a single
``tile × tile`` canvas (``haplo.anyres.image_tiles`` with one pinpoint), CLIP-normalised like the model's input.
The probe is thrown away; :func:`train_teacher` saves the vision tower with ``save_pretrained``.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron.solo.haplo.anyres import CLIP_MEAN, CLIP_STD, AnyresConfig, image_tiles


@dataclass(frozen=True, kw_only=True)
class TeacherConfig:
    """The tiny teacher's geometry and its training."""

    image_size: int = 56
    """A tile's side in pixels: the HaploVL model's ``tile_size`` (the trainer refuses another)."""
    patch_size: int = 14
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    steps: int = 300
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0

    def __post_init__(self):
        for name in ("image_size", "patch_size", "hidden_size", "num_layers", "num_heads", "steps", "batch_size"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"TeacherConfig.{name} must be a positive int, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"TeacherConfig.image_size: {self.image_size} is not a multiple of {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"TeacherConfig.hidden_size: {self.hidden_size} is not divisible by {self.num_heads}")
        if not self.lr > 0:
            raise ValueError(f"TeacherConfig.lr must be positive, got {self.lr!r}")


def read_label_folders(root: str | os.PathLike) -> tuple[list[tuple[Path, int]], list[str]]:
    """ImageNet-style ``root/train/<wnid>/*.png`` + ``root/classes.txt`` (``<wnid> <name>`` lines) →
    ([(image, class index)], class names)."""
    root = Path(root)
    lines = (root / "classes.txt").read_text(encoding="utf-8").splitlines()
    wnids, names = zip(*(line.split(" ", 1) for line in lines if line.strip()), strict=True)
    items = [(path, i) for i, w in enumerate(wnids) for path in sorted((root / "train" / w).glob("*.png"))]
    if not items:
        raise ValueError(f"{root}/train: no images in the class folders of {root / 'classes.txt'}")
    return items, list(names)


def tile_pixels(paths: list[Path], image_size: int, patch_size: int = 14) -> torch.Tensor:
    """Images → float32 ``[n, 3, T, T]``: each letterboxed onto one ``T``-px tile, CLIP-normalised."""
    from megatron.solo.image import load_image

    tiling = AnyresConfig(tile_size=image_size, patch_size=patch_size, pinpoints=((image_size, image_size),))
    tiles = np.stack([image_tiles(load_image(p).convert("RGB"), tiling)[0] for p in paths])  # [n, T, T, 3]
    x = torch.from_numpy(tiles).float().div_(255.0).permute(0, 3, 1, 2)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class ProbedTeacher(torch.nn.Module):
    """A ``CLIPVisionModel`` and a linear probe on its mean-pooled last-layer patch features."""

    def __init__(self, config: TeacherConfig, num_classes: int):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        vision = CLIPVisionConfig(
            image_size=config.image_size,
            patch_size=config.patch_size,
            hidden_size=config.hidden_size,
            intermediate_size=4 * config.hidden_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
        )
        self.vision = CLIPVisionModel(vision)
        self.probe = torch.nn.Linear(config.hidden_size, num_classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [n, 3, T, T] → class logits [n, classes]."""
        hidden = self.vision(pixel_values=pixels).last_hidden_state[:, 1:]  # [n, patches, C], CLS dropped
        return self.probe(hidden.mean(dim=1))


def train_teacher(
    label_root: str | os.PathLike, out_dir: str | os.PathLike, config: TeacherConfig = TeacherConfig(), log=print
) -> dict[str, float]:
    """Train the probed teacher on ``label_root`` (:func:`read_label_folders`), save its vision tower to
    ``out_dir`` (``save_pretrained``); returns the first and last steps' losses and the final training accuracy."""
    items, names = read_label_folders(label_root)
    torch.manual_seed(config.seed)
    pixels = tile_pixels([p for p, _ in items], config.image_size, config.patch_size)
    labels = torch.tensor([c for _, c in items])
    model = ProbedTeacher(config, len(names))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.steps, pct_start=0.1)
    rng = random.Random(config.seed)
    order: list[int] = []
    losses = []
    model.train()
    for step in range(config.steps):
        if len(order) < config.batch_size:
            order += rng.sample(range(len(items)), len(items))
        batch, order = order[: config.batch_size], order[config.batch_size :]
        loss = torch.nn.functional.cross_entropy(model(pixels[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if log and (step + 1) % max(config.steps // 5, 1) == 0:
            log(f"teacher: step {step + 1}/{config.steps} loss {loss.item():.4f}")
    model.eval()
    with torch.no_grad():
        accuracy = float((model(pixels).argmax(-1) == labels).float().mean())
    model.vision.save_pretrained(out_dir)
    return {"first_loss": losses[0], "last_loss": losses[-1], "train_accuracy": accuracy}


__all__ = ["ProbedTeacher", "TeacherConfig", "read_label_folders", "tile_pixels", "train_teacher"]
