"""Stage 1: the any-order AR transformer (and the raster baseline: the same module, raster orders).

Training only; sampling, extraction and editing are predict jobs of their own (`lightning_modules/predict.py`).
A thin adapter: the network and optimizer are injected; orders come from `models.orders`. Validation reports NLL in
bits per token under raster and random orders (and the inferred and own orders every N epochs). The callbacks'
samples (FID, LPIPS, order heatmaps) use `generate`, with the sampler settings the checkpoint's sampling job
would use (`Trained.sampler`).
"""

import hashlib
import logging
import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable

from evaluation.nll import nll_under_orders
from evaluation.sampling import sample_images
from lightning_modules import learning_rate
from lightning_modules.checkpoint_checks import check_trained_classes, check_trained_tokenizer, tokenizer_record
from lightning_modules.predict import DEFAULT_SAMPLER, ARFacts, Trained, frozen_tokenizer
from models.checkpoint import net_spec, plain_data
from models.logits import EXTRACTION_SCORES
from models.orders import mixed_order, random_order, raster_order
from models.sampling import NOISY_CHOICE_TEMPERATURE, SamplerSettings
from models.transformer import OrderedTransformer

log = logging.getLogger("oar.train")


class AnyOrderModule(ARFacts, LightningModule):
    """Trains `net` on raster or per-sample random orders; samples and extracts orders in `predict`.

    Args:
        net: the ordered transformer (vocab_size, grid_size, num_classes are linked from the data).
        train_order: raster (the baseline) | random (any-order, OAR stage 1).
        curriculum_steps: with random orders, a raster-to-random curriculum (sigma-GPT): the share of
            sequences trained on a random order (the rest raster) rises linearly from
            `curriculum_start` to 1 over this many steps; 0 = random orders from the start.
        curriculum_start: the share of random orders at step 0 of the curriculum.
        label_dropout: probability of replacing the class by the null class (for CFG).
        optimizer: injected optimizer factory.
        warmup_steps: linear learning-rate warm-up steps, then cosine decay to `min_lr_ratio`.
        min_lr_ratio: final learning rate as a share of the peak.
        sampler: settings used by `generate` (the callbacks' samples); policy and choice_temperature "auto"
            are what a sampling job of this checkpoint would use (`lightning_modules.predict.Trained.sampler`).
        inferred_nll_score: the extraction score of the inferred-order NLL (`models.logits.SCORES`): true_prob
            (the paper's, a lower bound) or max_prob (the model's own order, a proper likelihood).
        tokenizer_ckpt: the frozen tokenizer that decodes samples (the CLI sets it to
            data.init_args.tokenizer_ckpt); None: no decoding (`generate` refuses).
        val_order_seed: seed of the random orders used for validation NLL (the same every epoch).
        inferred_nll_every_n_epochs: every N epochs, also report the NLL under the model's own
            inferred order (teacher-forced greedy extraction, ~n/2 forwards a batch); 0 = never.
        inferred_nll_batches: validation batches that get the inferred-order NLL.
    """

    def __init__(self, net: OrderedTransformer, train_order: str = "random", curriculum_steps: int = 0,
                 curriculum_start: float = 0.0, label_dropout: float = 0.1,
                 optimizer: OptimizerCallable = torch.optim.AdamW, warmup_steps: int = 200,
                 min_lr_ratio: float = 0.1, sampler: SamplerSettings = DEFAULT_SAMPLER,
                 tokenizer_ckpt: str | None = None, val_order_seed: int = 1234,
                 inferred_nll_every_n_epochs: int = 0, inferred_nll_batches: int = 2,
                 inferred_nll_score: str = "true_prob"):
        super().__init__()
        if train_order not in ("raster", "random"):
            raise ValueError(f"model.init_args.train_order must be 'raster' or 'random', got {train_order!r}")
        if inferred_nll_score not in EXTRACTION_SCORES:
            raise ValueError(f"model.init_args.inferred_nll_score = {inferred_nll_score!r} is unknown: choose one of "
                             f"{', '.join(EXTRACTION_SCORES)}")
        self.save_hyperparameters()  # under the CLI: the whole config, so --ckpt_path rebuilds this module
        self.net, self.optimizer = net, optimizer
        checks = [("curriculum_steps", curriculum_steps >= 0, ">= 0 (0 = random orders from the start)"),
                  ("curriculum_start", 0.0 <= curriculum_start <= 1.0, "a share in [0, 1]"),
                  ("label_dropout", 0.0 <= label_dropout <= 1.0, "a probability in [0, 1]"),
                  ("warmup_steps", warmup_steps >= 0, ">= 0"),
                  ("min_lr_ratio", 0.0 <= min_lr_ratio <= 1.0, "in [0, 1]"),
                  ("inferred_nll_every_n_epochs", inferred_nll_every_n_epochs >= 0, ">= 0 (0 = never)"),
                  ("inferred_nll_batches", inferred_nll_batches >= 1, ">= 1")]
        for key, ok, expected in checks:
            if not ok:
                raise ValueError(f"model.init_args.{key} = {locals()[key]} is impossible: set it to {expected}")
        self.train_order, self.label_dropout = train_order, label_dropout
        self.curriculum_steps, self.curriculum_start = curriculum_steps, curriculum_start
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio
        self.sampler_settings = replace(sampler)  # as configured ("auto" kept): see `sampler`
        self.tokenizer_ckpt, self.val_order_seed = tokenizer_ckpt, val_order_seed
        self.inferred_nll_every_n_epochs, self.inferred_nll_batches = inferred_nll_every_n_epochs, inferred_nll_batches
        self.inferred_nll_score = inferred_nll_score
        self._draw_seed: int | None = None  # the seed of the training draws (see `train_generator`)
        self._draws = (-1, 0)  # (global step, batches drawn at it)
        self.tokenizer = frozen_tokenizer(tokenizer_ckpt)  # a submodule: checkpoints stay self-contained

    # ---- training ---------------------------------------------------------------------------------
    def orders_for(self, batch: dict, stage: str, generator: torch.Generator | None = None) -> torch.Tensor:
        """The order each sequence of the batch is trained on, (b, n); random draws from `generator`."""
        b, n = batch["tokens"].shape[0], batch["tokens"][0].numel()
        if self.train_order == "raster":
            return raster_order(b, n, device=self.device)
        if stage == "train" and self.global_step < self.curriculum_steps:
            return mixed_order(b, n, self.random_share(self.global_step), generator=generator, device=self.device)
        return random_order(b, n, generator=generator, device=self.device)

    def on_fit_start(self) -> None:
        """Fix the seed of the training draws: the run's seed on a fresh fit, the checkpoint's on a resume
        (`on_load_checkpoint` runs first). A network not told the next cell trains on raster orders only."""
        if self.train_order != "raster" and not self.net.knows_next_cell:
            raise ValueError("model.init_args.net.init_args.next_pos is none (the network is not told the next cell): "
                             "train it on raster orders (model.init_args.train_order: raster, configs/experiment/"
                             "raster.yaml) or choose absolute, relative, target_rope or instruction")
        if self._draw_seed is None:
            self._draw_seed = torch.initial_seed()

    def on_train_start(self) -> None:
        """Under DDP every rank is seeded alike (`seed_everything`): offset the global generator by the rank, so
        what still draws from it (dropout) differs between ranks. The training draws use `train_generator`. A
        resumed fit keeps the configured learning rate (`lightning_modules.learning_rate`)."""
        learning_rate.restore_configured(self)
        if self.trainer.world_size > 1:
            torch.manual_seed(torch.initial_seed() + self.global_rank)

    def train_generator(self) -> torch.Generator:
        """The generator of one training batch's draws (orders, curriculum and random-order mixes, label
        dropout), seeded by the run's seed, the DDP rank, the global step and the batch's place within the step
        (gradient accumulation): the draws depend on the step, not on what ran before, so a resumed fit draws
        what an uninterrupted one would (the global generator restarts from the seed), and ranks differ."""
        step = self.global_step
        count = self._draws[1] + 1 if self._draws[0] == step else 0
        self._draws = (step, count)
        base = torch.initial_seed() if self._draw_seed is None else self._draw_seed
        digest = hashlib.sha256(f"{base}/{self.global_rank}/{step}/{count}".encode()).digest()
        return torch.Generator(device=self.device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    def random_share(self, step: int) -> float:
        """Share of random orders at training step `step` under the raster-to-random curriculum."""
        if step >= self.curriculum_steps:
            return 1.0
        return self.curriculum_start + (1.0 - self.curriculum_start) * step / self.curriculum_steps

    def _loss(self, tokens: torch.Tensor, order: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        logits = self.net(tokens, order, cond)
        return F.cross_entropy(logits.flatten(0, 1).float(), tokens.gather(1, order).flatten())

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        tokens, cond = batch["tokens"].flatten(1), batch["label"]
        generator = self.train_generator() if stage == "train" else None
        if stage == "train" and self.label_dropout > 0:
            cond = self.net.drop_labels(cond, self.label_dropout, generator=generator)
        loss = self._loss(tokens, self.orders_for(batch, stage, generator), cond)
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=stage != "train", batch_size=len(tokens))
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        every = self.inferred_nll_every_n_epochs
        self._eval_step(batch, batch_idx, "val", inferred=bool(every) and (self.current_epoch + 1) % every == 0)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """The validation metrics on the DataModule's test split (its validation images), as test/..."""
        self._eval_step(batch, batch_idx, "test", inferred=self.inferred_nll_every_n_epochs > 0)

    def _eval_step(self, batch: dict, batch_idx: int, stage: str, inferred: bool) -> None:
        """Loss and bits per token under raster, random (seeded: the same every epoch) and inferred orders."""
        self._step(batch, stage)
        tokens, cond = batch["tokens"].flatten(1), batch["label"]
        gen = torch.Generator(device=self.device).manual_seed(self.val_order_seed + batch_idx)
        inferred = inferred and batch_idx < self.inferred_nll_batches
        bits = nll_under_orders(self.net, tokens, cond, gen, inferred=inferred, score=self.inferred_nll_score)
        for name, values in bits.items():
            self.log(f"{stage}/nll_{name}", values.mean(), sync_dist=True, batch_size=len(tokens))

    def configure_optimizers(self):
        optimizer = self.optimizer(self.net.parameters())
        total = max(1, self.trainer.estimated_stepping_batches)

        def lr_lambda(step: int) -> float:
            if step < self.warmup_steps:
                return (step + 1) / self.warmup_steps
            progress = min(1.0, (step - self.warmup_steps) / max(1, total - self.warmup_steps))
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        learning_rate.remember(self, [optimizer])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record the network's spec and the tokenizer; keep hyper-parameters plain data (weights_only loads)."""
        checkpoint["net_spec"] = net_spec(self.net)
        checkpoint["trained"] = self.trained.record()  # what a predict job needs to know (read as plain data)
        checkpoint["draw_seed"] = self._draw_seed  # a resume draws on from the same seed (`train_generator`)
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"] = plain_data(checkpoint["hyper_parameters"])
        record = tokenizer_record(getattr(self._trainer, "datamodule", None))
        if record is not None:
            checkpoint["tokenizer"] = record

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """`--ckpt_path` (resume, sample, extract): refuse a checkpoint trained on another tokenizer."""
        self._draw_seed = checkpoint.get("draw_seed", self._draw_seed)
        if self._trainer is not None:  # not under `load_from_checkpoint`: no data to compare with
            what, datamodule = f"{self._trainer.ckpt_path} (--ckpt_path)", getattr(self._trainer, "datamodule", None)
            check_trained_tokenizer(checkpoint, what, datamodule)
            check_trained_classes(checkpoint, what, datamodule)

    # ---- generation (the callbacks' samples) --------------------------------------------------------------
    @property
    def trained(self) -> Trained:
        """This model's training, as its checkpoint records it for the predict jobs."""
        return Trained(type(self).__name__, self.train_order, self.auto_choice_temperature())

    @property
    def sampler(self) -> SamplerSettings:
        """The sampler settings in use: policy and choice_temperature "auto" made concrete (`Trained.sampler`)."""
        return self.trained.sampler(self.sampler_settings)

    def auto_choice_temperature(self) -> float:
        """The order-choice noise this model samples best with: a model trained on random orders collapses
        to easy-first samples under the greedy choice and needs noise (docs/study.md)."""
        return NOISY_CHOICE_TEMPERATURE

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, generator: torch.Generator | None = None,
                 policy: str | None = None, choice_generator: torch.Generator | None = None) -> dict:
        """Sample images for `labels` (b,) with the configured sampler settings (`policy` overrides theirs); see
        `evaluation.sampling.sample_images` for the dict returned."""
        if self.tokenizer is None:
            raise RuntimeError("no tokenizer to decode samples: pass tokenizer_ckpt (the CLI passes "
                               "data.init_args.tokenizer_ckpt)")
        settings = replace(self.sampler, policy=policy) if policy else self.sampler
        return sample_images(self.net, self.tokenizer.to(self.device), labels.to(self.device), settings, generator,
                             choice_generator)
