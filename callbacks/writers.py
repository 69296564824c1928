"""Prediction writers: sampled images with their orders (`samples.npz` + a PNG grid).

Each predict job module names its writer (`lightning_modules.predict.PredictModule.writer`) and checks it is there.
"""

import json
from dataclasses import asdict, is_dataclass

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torchvision.io import write_png

from callbacks.heatmaps import samples_with_heatmaps_grid
from callbacks.tensorboard import run_folder
from fileio import save_npz


class SampleWriter(BasePredictionWriter):
    """Writes what `predict` sampled: `samples.npz` and `samples.png` (images beside their order maps).

    `samples.npz` holds images (uint8 NHWC), tokens (N,h,w), orders as (N,h,w) maps of the step at
    which each cell was written, labels, and the sampler settings (JSON string). Under DDP each
    process writes `samples_rank<r>.npz`.

    Args:
        out_dir: folder for the files (default: the run's log folder).
        grid_rows: samples per row of the PNG grid.
        max_grid_images: the PNG shows the first this many samples (50,000 ImageNet samples would make a
            picture of gigapixels); samples.npz holds them all.
    """

    def __init__(self, out_dir: str | None = None, grid_rows: int = 8, max_grid_images: int = 256):
        super().__init__(write_interval="epoch")
        self.out_dir, self.grid_rows, self.max_grid_images = out_dir, grid_rows, max_grid_images

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        if not predictions:
            return
        cat = {k: torch.cat([o[k] for o in predictions]).cpu() for k in ("images", "tokens", "step_map", "labels")}
        settings = pl_module.sampler
        settings = asdict(settings) if is_dataclass(settings) else dict(settings)
        suffix = f"_rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        out_dir = run_folder(trainer, self.out_dir)
        save_npz(out_dir / f"samples{suffix}.npz", {
            "images": cat["images"].permute(0, 2, 3, 1).numpy(), "tokens": cat["tokens"].numpy(),
            "orders": cat["step_map"].numpy(), "labels": cat["labels"].numpy(),
            "sampler": np.array(json.dumps(settings))})
        n_steps = cat["tokens"][0].numel()
        shown = slice(0, self.max_grid_images)
        grid = samples_with_heatmaps_grid(cat["images"][shown], cat["step_map"][shown], n_steps, nrow=self.grid_rows)
        write_png(grid, str(out_dir / f"samples{suffix}.png"))
