# Shapes: N images, S samples per image, h/w token grid, H/W image size.
"""The edit writer: `edits.npz` (every array of the run) and a PNG grid per batch, also logged to TensorBoard.

Each grid row is one image: the input | the masked input (regenerated cells grey) | the S edits | the
order map of each edit: the rank at which each regenerated cell was written (dark = first, yellow =
last, on one scale per grid; kept cells light grey).
"""

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BasePredictionWriter
from torchvision.io import write_png
from torchvision.utils import make_grid

from callbacks.heatmaps import MIN_TILE_PX, colorbar_image, step_map_to_rgb
from callbacks.tensorboard import run_folder, tensorboard_writer
from fileio import atomic_write, save_npz

MASK_GREY = 128  # the regenerated cells of the "masked input" column


def masked_inputs(inputs: torch.Tensor, regenerate: torch.Tensor) -> torch.Tensor:
    """uint8 images (N,3,H,W) with the regenerated cells (N,h,w) painted grey."""
    pixels = F.interpolate(regenerate[:, None].float(), size=inputs.shape[-2:], mode="nearest").bool()
    return inputs.masked_fill(pixels, MASK_GREY)


def edit_grid(inputs: torch.Tensor, regenerate: torch.Tensor, outputs: torch.Tensor,
              step_maps: torch.Tensor) -> torch.Tensor:
    """One row per image: input | masked input | S edits | S order maps, with the colour legend on the right.

    Args:
        inputs: uint8 (N,3,H,W).
        regenerate: (N,h,w) bool.
        outputs: uint8 (N,S,3,H,W).
        step_maps: (N,S,h,w) rank of each regenerated cell, -1 for kept cells.

    Returns:
        uint8 (3,H',W').
    """
    n, s = outputs.shape[:2]
    maps = step_maps.double().masked_fill(step_maps < 0, float("nan"))
    n_steps = max(int(step_maps.max()) + 1, 1)  # one scale for the grid: the most regenerated cells of an image
    size = tuple(inputs.shape[-2:])
    heat = step_map_to_rgb(maps.flatten(0, 1), n_steps, out_size=size).view(n, s, 3, *size)
    row = torch.cat([inputs[:, None], masked_inputs(inputs, regenerate)[:, None], outputs, heat], dim=1)
    tiles = row.flatten(0, 1)  # (N * (2 + 2S), 3, H, W)
    factor = math.ceil(MIN_TILE_PX / tiles.shape[-2])
    if factor > 1:  # small images scaled up (nearest) so the cells stay visible
        tiles = F.interpolate(tiles, scale_factor=factor, mode="nearest-exact")
    grid = make_grid(tiles, nrow=2 + 2 * s, padding=4, pad_value=255)
    return torch.cat([grid, colorbar_image(n_steps, grid.shape[1])], dim=-1)


class EditWriter(BasePredictionWriter):
    """Writes what `predict` edited (`lightning_modules.edit.EditModule`): `edits.npz` and `edits_batch<k>.png`.

    `edits.npz`: inputs uint8 (N,H,W,3); masks (N,h,w) bool (True = regenerated); outputs uint8 (N,S,H,W,3);
    tokens (N,S,h,w); step_maps (N,S,h,w) (rank at which each regenerated cell was written, -1 kept);
    reconstructions uint8 (N,H,W,3) (the input's tokens decoded); labels, target_classes, index (N,);
    names (N,) str; settings (JSON: sampler, edit, where the known cells went, checkpoint). Under DDP each
    process writes `edits_rank<r>.npz` and its own PNGs.

    Args:
        out_dir: folder for the files (default: the run's log folder).
    """

    KEYS = ("inputs", "regenerate", "outputs", "tokens", "step_maps", "reconstructions", "labels", "targets", "index")

    def __init__(self, out_dir: str | None = None):
        super().__init__(write_interval="batch")
        self.out_dir = out_dir
        self.kept: list[dict] = []

    def _folder(self, trainer) -> Path:
        return run_folder(trainer, self.out_dir)

    def _suffix(self, trainer) -> str:
        return f"_rank{trainer.global_rank}" if trainer.world_size > 1 else ""

    def on_predict_start(self, trainer, pl_module) -> None:
        self.kept = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        kept = {k: prediction[k].cpu() for k in self.KEYS}
        kept["names"] = list(prediction["names"])
        self.kept.append(kept)
        grid = edit_grid(kept["inputs"], kept["regenerate"], kept["outputs"], kept["step_maps"])
        path = self._folder(trainer) / f"edits_batch{batch_idx}{self._suffix(trainer)}.png"
        atomic_write(path, lambda tmp: write_png(grid, str(tmp)))
        writer = tensorboard_writer(trainer)
        if writer is not None:
            writer.add_image(f"edit/batch_{batch_idx}", grid, global_step=trainer.global_step)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        if not self.kept:
            return
        cat = {k: torch.cat([b[k] for b in self.kept]) for k in self.KEYS}
        settings = {"sampler": asdict(pl_module.sampler), "edit": asdict(pl_module.edit),
                    "known_cells": pl_module.edit.placement(pl_module.sampler.policy),
                    "checkpoint": str(pl_module.checkpoint)}
        nhwc = lambda x: x.movedim(-3, -1).numpy()  # noqa: E731  (..., 3, H, W) -> (..., H, W, 3)
        save_npz(self._folder(trainer) / f"edits{self._suffix(trainer)}.npz", {
            "inputs": nhwc(cat["inputs"]), "masks": cat["regenerate"].numpy(), "outputs": nhwc(cat["outputs"]),
            "tokens": cat["tokens"].numpy(), "step_maps": cat["step_maps"].numpy(),
            "reconstructions": nhwc(cat["reconstructions"]), "labels": cat["labels"].numpy(),
            "target_classes": cat["targets"].numpy(), "index": cat["index"].numpy(),
            "names": np.array([n for b in self.kept for n in b["names"]]),
            "settings": np.array(json.dumps(settings, default=str))})
        self.kept = []
