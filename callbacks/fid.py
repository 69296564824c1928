"""FID (and optionally KID) of generated samples against real validation images, during training.

The metric is `evaluation.fid.FidKid` (torchmetrics on a pluggable feature network); it and its feature
network live in the callback, never in the LightningModule, so Inception's
~95 MB of weights stay out of every checkpoint (a callback's `state_dict()` is empty by default). They
are built lazily, on the module's device, at first use.

Inception weights, in order of preference:
1. `weights_path:` a local copy of torch-fidelity's pt_inception weights file (`INCEPTION_FILE`),
   handed to torchmetrics as `feature_extractor_weights_path`;
2. the torch hub cache (`<torch hub dir>/checkpoints/INCEPTION_FILE`), where torch-fidelity
   downloads it from `INCEPTION_URL` when online (a download with a bounded socket timeout).
When neither works (offline, no file) the callback warns once, skips the metric and training goes on.

Reference statistics (`reference_stats`, an `.npz` of Inception's mu and sigma in the format of ADM's ImageNet
reference batches): FID the way papers report it, `num_samples` generated images (e.g. 50,000) against the
statistics, no real image read; KID is then unavailable. `python run.py test ... --fid.init_args.reference_stats
VIRTUAL_imagenet256_labeled.npz --fid.init_args.num_samples 50000` logs "test/fid" (docs/imagenet.md).

Distributed runs: every process generates its share of the samples (chunks of `batch_size`, or fewer
per chunk so that each process gets one; chunk j seeded `seed + j`, see `evaluation.sampling`) and
of the real images; the metrics' states (feature sums and covariances) are summed over processes by
torchmetrics when they compute (`sync_on_compute=True`). Every process then holds the same value and
logs it (`sync_dist=True`), so "val/fid" can be a `ModelCheckpoint`/`EarlyStopping` monitor under DDP
too. The processes first agree that the metric is available (if one cannot load it, all skip it).
"""

import lightning.pytorch as pl
import torch

from callbacks.schedule import PeriodicEvaluation
from evaluation.distributed import all_ranks_agree, process_share, share_chunk_size
from evaluation.fid import INCEPTION_FILE, INCEPTION_URL, REFERENCE_KEY, FidKid, load_reference_stats
from evaluation.sampling import cycle_labels, eval_mode, generate_batches
from evaluation.weights import hub_checkpoint_dir


class FIDCallback(PeriodicEvaluation):
    """Log "val/fid" (and "val/kid") every few epochs and when training ends; "test/fid" (and "test/kid") after testing.

    When it runs: `callbacks.schedule.PeriodicEvaluation` (also once more as training ends). Generates
    `num_samples` images (labels cycling over the classes, a fixed seed, so epochs differ only by
    training) and compares them with the first `num_samples` validation images from
    `trainer.datamodule.real_images(num, split="val")`. Real features are computed once per run.
    With a few hundred samples FID is biased upwards (its covariances need >= feature_dim samples to be
    full rank): read it as a trend within a run; the paper's numbers use 50k samples.

    Args:
        every_n_epochs: evaluate at the end of every this many validation epochs, and at the end of
            training; 0 = never during training (testing still logs "test/fid").
        num_samples: generated and real images compared.
        batch_size: generation and feature-extraction batch size.
        weights_path: local torch-fidelity Inception file (`INCEPTION_FILE`, from `INCEPTION_URL`).
        feature_extractor: replaces Inception (e.g. `class_path:` in YAML). It receives uint8 images
            (b,3,H,W) in [0,255] at the data resolution and must return float features (b,d); give it a
            `num_features` attribute or it is probed once with a dummy image. `weights_path` and
            `feature_dim` are then unused.
        feature_dim: Inception feature layer: 64, 192, 768 or 2048 (the standard FID).
        kid: also log KID (mean over subsets), sharing the same feature network.
        seed: seed of the sampling generator.
        reference_stats: an `.npz` with the real set's `mu` and `sigma` (ADM's reference batches; read when the
            callback is built, so a bad file stops the run before any work): `num_samples` generated images are
            compared with them instead of with validation images. Needs kid false.
    """

    def __init__(
        self,
        every_n_epochs: int = 5,
        num_samples: int = 256,
        batch_size: int = 64,
        weights_path: str | None = None,
        feature_extractor: torch.nn.Module | None = None,
        feature_dim: int = 2048,
        kid: bool = False,
        seed: int = 0,
        reference_stats: str | None = None,
    ):
        super().__init__(every_n_epochs)
        if reference_stats is not None and kid:
            raise ValueError(f"KID needs real images, not statistics: set fid.init_args.kid false with {REFERENCE_KEY}")
        self.reference_stats = reference_stats
        self._reference = None if reference_stats is None else load_reference_stats(reference_stats)
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.weights_path = weights_path
        self.feature_extractor = feature_extractor
        self.feature_dim = feature_dim
        self.kid = kid
        self.seed = seed
        self._metric: FidKid | None = None
        self._real_done = False

    def scores(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        return self.evaluate(pl_module, trainer.datamodule)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.log_scores(trainer, pl_module, "test")

    @torch.inference_mode()  # as in Lightning's eval loops: the metric states are made and updated in it
    def evaluate(self, pl_module: pl.LightningModule, datamodule: pl.LightningDataModule) -> dict[str, float]:
        """Compute the scores now: {"fid": ..., "kid": ...}; {} when the metric is unavailable.

        Under torch.distributed every process must call it (each computes its share, then they sync).
        """
        if self._disabled:
            return {}
        if not hasattr(pl_module, "generate") or not hasattr(datamodule, "real_images"):
            self._disable("needs `pl_module.generate` and `datamodule.real_images`; skipped.")
            return {}
        device, (rank, world) = pl_module.device, process_share()
        if self._reference is None:
            real = datamodule.real_images(self.num_samples, split="val")
            count, shape = len(real), tuple(real.shape[1:])
        else:  # only the images' shape is needed
            count, shape = self.num_samples, (3, datamodule.image_size, datamodule.image_size)
        if count < world:
            self._disable(f"{count} images cannot be shared by {world} processes; FID is skipped "
                          f"(set num_samples >= {world} in the FIDCallback's init_args).")
            return {}
        metric = self._get_metric(device, shape)
        if not all_ranks_agree(metric is not None, device):
            if metric is not None:
                self._disable("the metric failed to load in another process; FID is skipped.")
            return {}
        chunk = share_chunk_size(count, self.batch_size, world)
        if not self._real_done:  # the metric keeps the real features (or the statistics) across compute()
            if self._reference is not None:
                metric.use_reference(*self._reference, here=rank == 0)  # the states are summed over processes
            else:
                for batch in real.split(chunk)[rank::world]:
                    metric.update(batch, real=True)
            self._real_done = True
        labels = cycle_labels(count, pl_module.num_classes)
        with eval_mode(pl_module):
            for out in generate_batches(pl_module, labels, chunk, self.seed, rank=rank, world_size=world):
                metric.update(out["images"], real=False)
        return metric.compute(kid_subset_size=min(1000, count))

    def _get_metric(self, device: torch.device, image_shape: tuple) -> FidKid | None:
        if self._metric is None and not self._disabled:
            try:
                self._metric = FidKid(self.feature_extractor, self.weights_path, self.feature_dim, kid=self.kid,
                                      input_img_size=image_shape, sync_on_compute=True)  # states summed over processes
            except Exception as err:  # any failure: a missing metric must never stop training
                self._disable(self._failure_message(err))
                return None
        if self._metric is not None:
            self._metric = self._metric.to(device)
        return self._metric

    def _failure_message(self, err: Exception) -> str:
        if self.feature_extractor is not None:
            return f"the feature_extractor failed ({err!r}); FID is skipped, training goes on."
        return (
            f"could not load the Inception weights ({err!r}); FID is skipped for this run, "
            f"training goes on. FID needs torch-fidelity's pt_inception weights file {INCEPTION_FILE} "
            f"(from {INCEPTION_URL}). Offline, copy it into the torch hub cache ({hub_checkpoint_dir()}) "
            f"or set it with --fid.init_args.weights_path /path/to/{INCEPTION_FILE} (or under `fid:` in the config); "
            "--fid null removes FID."
        )
