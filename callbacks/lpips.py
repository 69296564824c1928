"""Sample diversity: mean pairwise LPIPS among samples of the same class, during training.

LPIPS is `evaluation.lpips` (torchmetrics; the backbone from the torch hub cache or a local
`weights_path`, see `evaluation.weights`). When the backbone is neither cached, nor given, nor
downloadable, the callback warns once and skips. Like `FIDCallback`, the metric lives in the callback
(not in checkpoints); under torch.distributed each process generates its share of the classes (one
chunk per class, seeded `seed + j`) and the pair scores are summed over processes, so every process
logs the one-process value.
"""

import os

import lightning.pytorch as pl
import torch
from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

from callbacks.schedule import PeriodicEvaluation
from evaluation.distributed import all_ranks_agree, all_sum, process_share
from evaluation.lpips import BACKBONE_URLS, build_lpips, mean_pairwise_lpips
from evaluation.sampling import eval_mode, generate_batches
from evaluation.weights import hub_checkpoint_dir


def classes_to_eval(num_classes: int, k: int) -> torch.Tensor:
    """k distinct classes spread evenly over [0, C) (class 0 when unconditional): long (k',)."""
    if num_classes <= 0:
        return torch.zeros(1, dtype=torch.long)
    return torch.linspace(0, num_classes - 1, min(k, num_classes)).round().long().unique()


class LPIPSDiversityCallback(PeriodicEvaluation):
    """Log "val/lpips_diversity": mean LPIPS over all pairs of samples of the same class.

    Higher means more varied samples; a collapsing model drifts towards 0. Also evaluated when training
    ends (logged at the final global step) unless the last evaluation was at that step.

    Args:
        every_n_epochs: evaluate at the end of every this many validation epochs and of training; 0 = never.
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
        super().__init__(every_n_epochs)
        if samples_per_class < 2:
            raise ValueError("samples_per_class must be >= 2 to form pairs")
        if net_type not in BACKBONE_URLS:
            raise ValueError(f"net_type must be one of {sorted(BACKBONE_URLS)}, got {net_type!r}")
        self.samples_per_class = samples_per_class
        self.num_classes_to_eval = num_classes_to_eval
        self.net_type = net_type
        self.weights_path = weights_path
        self.seed = seed
        self._metric: LearnedPerceptualImagePatchSimilarity | None = None

    def scores(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        value = self.evaluate(pl_module)
        return {} if value is None else {"lpips_diversity": value}

    @torch.inference_mode()  # as in Lightning's eval loops: the metric states are made and updated in it
    def evaluate(self, pl_module: pl.LightningModule) -> float | None:
        """Mean pairwise same-class LPIPS of fresh samples; None when LPIPS is unavailable.

        Under torch.distributed every process must call it (each scores its share, then they sum).
        """
        if self._disabled:
            return None
        metric = self._get_metric(pl_module)
        if not all_ranks_agree(metric is not None, pl_module.device):
            if metric is not None:
                self._disable("the backbone failed to load in another process; LPIPS diversity is skipped.")
            return None
        rank, world = process_share()
        classes = classes_to_eval(pl_module.num_classes, self.num_classes_to_eval)
        labels = classes.repeat_interleave(self.samples_per_class)
        local = torch.zeros(2)  # (sum of pair scores, pairs) of this process
        with eval_mode(pl_module):
            # One class per chunk (batch_size = samples_per_class), so a process's share is whole classes.
            for out in generate_batches(pl_module, labels, self.samples_per_class, self.seed, rank=rank,
                                        world_size=world):
                mean, pairs = mean_pairwise_lpips(metric, out["images"])
                local += torch.tensor([mean * pairs, pairs])
        total = all_sum(local.to(metric.device))
        return float(total[0] / total[1])  # the mean over all pairs (same count per class)

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
