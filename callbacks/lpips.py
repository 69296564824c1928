"""Sample diversity: mean pairwise LPIPS among samples of the same class, during training.

torchmetrics' LPIPS has two parts with different sources:
- the linear heads ship inside torchmetrics (`torchmetrics/functional/image/lpips_models/<net>.pth`),
  so they never need the network;
- the backbone is torchvision's ImageNet AlexNet / VGG16 / SqueezeNet 1.1, downloaded through torch.hub
  into `<torch hub dir>/checkpoints/<file>` (`BACKBONE_URLS`). torchmetrics offers no way to pass it a
  file, so `weights_path:` points torch.hub at a temporary hub folder in which the expected file name
  links to your file; torch.hub loads a cached file as is (the hash is only checked on download).
When the backbone is neither cached, nor given, nor downloadable, the callback warns once and skips.
Like `FIDCallback`, the metric lives in the callback (not in checkpoints) and only global rank 0 computes.
"""

import os

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

from callbacks.order_dump import eval_mode, generate_batches, is_due
from models.weights import BACKBONE_URLS, build_lpips, hub_checkpoint_dir

# AlexNet's stride-4 stem and pools shrink a 28-32 px image to nothing; LPIPS sees at least this size.
MIN_LPIPS_PX = 64


def classes_to_eval(num_classes: int, k: int) -> torch.Tensor:
    """k distinct classes spread evenly over [0, C) (class 0 when unconditional): long (k',)."""
    if num_classes <= 0:
        return torch.zeros(1, dtype=torch.long)
    return torch.linspace(0, num_classes - 1, min(k, num_classes)).round().long().unique()


class LPIPSDiversityCallback(pl.Callback):
    """Log "val/lpips_diversity": mean LPIPS over all pairs of samples of the same class.

    Higher means more varied samples; a collapsing model drifts towards 0.

    Args:
        every_n_epochs: evaluate at the end of every this many validation epochs.
        samples_per_class: samples generated per evaluated class (>= 2).
        num_classes_to_eval: classes evaluated, spread evenly over the label range.
        net_type: LPIPS backbone: "alex", "vgg" or "squeeze".
        weights_path: local torchvision backbone checkpoint, e.g. alexnet-owt-7be5be79.pth from
            https://download.pytorch.org/models/alexnet-owt-7be5be79.pth (see `BACKBONE_URLS`).
        seed: seed of the sampling generator.
    """

    def __init__(
        self,
        every_n_epochs: int = 5,
        samples_per_class: int = 8,
        num_classes_to_eval: int = 4,
        net_type: str = "alex",
        weights_path: str | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if samples_per_class < 2:
            raise ValueError("samples_per_class must be >= 2 to form pairs")
        if net_type not in BACKBONE_URLS:
            raise ValueError(f"net_type must be one of {sorted(BACKBONE_URLS)}, got {net_type!r}")
        self.every_n_epochs = every_n_epochs
        self.samples_per_class = samples_per_class
        self.num_classes_to_eval = num_classes_to_eval
        self.net_type = net_type
        self.weights_path = weights_path
        self.seed = seed
        self._metric: LearnedPerceptualImagePatchSimilarity | None = None
        self._disabled = False

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        if is_due(trainer.current_epoch, self.every_n_epochs):
            value = self.evaluate(pl_module)
            if value is not None:
                pl_module.log("val/lpips_diversity", value, rank_zero_only=True)

    @torch.inference_mode()  # as in Lightning's eval loops: the metric states are made and updated in it
    def evaluate(self, pl_module: pl.LightningModule) -> float | None:
        """Mean pairwise same-class LPIPS of fresh samples; None when LPIPS is unavailable."""
        metric = self._get_metric(pl_module)
        if metric is None:
            return None
        classes = classes_to_eval(pl_module.num_classes, self.num_classes_to_eval)
        labels = classes.repeat_interleave(self.samples_per_class)
        first, second = torch.triu_indices(self.samples_per_class, self.samples_per_class, offset=1)
        with eval_mode(pl_module):
            # One class per batch: batch_size = samples_per_class.
            for out in generate_batches(pl_module, labels, self.samples_per_class, self.seed):
                images = out["images"].to(metric.device).float() / 255
                if min(images.shape[-2:]) < MIN_LPIPS_PX:
                    # clamp: rounding may overshoot 1 by an ulp, and torchmetrics rejects that
                    images = F.interpolate(images, size=MIN_LPIPS_PX, mode="bilinear").clamp(0, 1)
                metric.update(images[first], images[second])
            value = float(metric.compute())  # the mean over all pairs (same count per class)
        metric.reset()
        return value

    def _get_metric(self, pl_module: pl.LightningModule) -> LearnedPerceptualImagePatchSimilarity | None:
        if self._disabled:
            return None
        if not hasattr(pl_module, "generate"):
            self._disable(f"{type(pl_module).__name__} has no `generate`; LPIPS diversity is skipped.")
            return None
        if self._metric is None:
            try:
                self._metric = build_lpips(self.net_type, self.weights_path)
            except Exception as err:  # any failure: a missing metric must never stop training
                url = BACKBONE_URLS[self.net_type]
                self._disable(
                    f"could not load the LPIPS {self.net_type} backbone ({err!r}); LPIPS diversity is "
                    f"skipped for this run, training goes on. It is torchvision's {os.path.basename(url)} "
                    f"(from {url}). Offline, copy it into the torch hub cache ({hub_checkpoint_dir()}) or "
                    f"set `weights_path: /path/to/{os.path.basename(url)}` in the LPIPSDiversityCallback's "
                    "init_args (trainer.callbacks in the config)."
                )
                return None
        self._metric = self._metric.to(pl_module.device)
        return self._metric

    def _disable(self, message: str) -> None:
        self._disabled = True
        rank_zero_warn(f"LPIPSDiversityCallback: {message}")
