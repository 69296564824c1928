"""Stage 1: the any-order AR transformer (and the raster baseline: the same module, raster orders).

A thin adapter: the network and optimizer are injected; orders come from `models.orders`, decoding
from `models.sampling`. Validation reports NLL in bits per token under raster and random orders.
"""

import hashlib
import logging
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable

from evaluation.nll import nll_under_orders
from lightning_modules.checkpoint_checks import check_trained_classes, check_trained_tokenizer, tokenizer_record
from lightning_modules.editing import EditMasks, EditSettings, edit_classes, edit_images
from models.checkpoint import load_net, net_spec, plain_data
from models.extraction import SCORES, extract_orders, noise_seeds
from models.orders import mixed_order, order_to_step_map, random_order, raster_order
from models.policies import SCHEDULES
from models.precision import PRECISIONS, resolve_dtype
from models.sampling import AUTO, NOISY_CHOICE_TEMPERATURE, SamplerSettings, choice_generator, sample
from models.transformer import OrderedTransformer

log = logging.getLogger("oar.train")

TOKENIZER_WHAT = "tokenizer checkpoint (data.init_args.tokenizer_ckpt)"
TOKENIZER_FIX = "make it with `python run.py fit --config configs/tokenizer.yaml`"
# What `predict` does, chosen by the stage config (model.init_args.predict_task), and the DataModule's
# predict splits each task runs over (data.init_args.predict_split).
PREDICT_SPLITS = {"sample": ("samples",), "extract": ("train", "val"),
                  "edit": ("images_val", "images_train", "images_all")}
PREDICT_CONFIGS = {"sample": "configs/sample.yaml", "extract": "configs/extract_orders.yaml",
                   "edit": "configs/edit.yaml"}


def check_predict_split(task: str, split: str) -> None:
    """Refuse a DataModule predict split that the predict task does not run over (one line naming the fix)."""
    if split not in PREDICT_SPLITS[task]:
        raise ValueError(f"model.init_args.predict_task = {task} runs over data.init_args.predict_split "
                         f"{' or '.join(PREDICT_SPLITS[task])}, not {split}: use {PREDICT_CONFIGS[task]} "
                         "(or set one of the two keys)")


@dataclass
class ExtractionSettings:
    """How `predict` extracts the orders of training images (teacher-forced greedy search).

    Attributes:
        score: true_prob (probability of the true token, default) | max_prob.
        positions_per_step: cells placed per step (1 = exact greedy; k > 1 trades exactness for speed).
        gumbel_temperature: Gumbel noise on the scores (0 = greedy).
        gumbel_schedule: constant | linear (the noise falls to 0 over the steps).
        random_first: the first this many cells of each image are placed uniformly at random.
        seed: seed of the Gumbel noise; each image's noise depends only on (seed, dataset index, flip
            view, k), so a resumed, re-sharded or multi-process extraction gives the same orders.
        orders_per_image: K, the orders extracted per image view, each with its own noise (k = 0 has the
            noise of one order per view); distillation trains each step on one of them, drawn at random.
            Without noise (gumbel_temperature 0, random_first 0) the K orders are copies.
        precision: fp32 | bf16 | auto (bf16 where the device has native bf16 matmuls); see
            `models.sampling.SamplerSettings.precision`.
    """

    score: str = "true_prob"
    positions_per_step: int = 1
    gumbel_temperature: float = 0.0
    gumbel_schedule: str = "constant"
    random_first: int = 0
    seed: int = 0
    precision: str = "fp32"
    orders_per_image: int = 1

    def __post_init__(self) -> None:
        where = "model.init_args.extraction."
        if self.score not in SCORES:
            raise ValueError(f"{where}score = {self.score!r} is unknown: choose one of {', '.join(SCORES)}")
        if self.positions_per_step < 1:
            raise ValueError(f"{where}positions_per_step = {self.positions_per_step} is impossible: set it to "
                             "an integer >= 1 (1 = exact greedy)")
        if not (math.isfinite(self.gumbel_temperature) and self.gumbel_temperature >= 0):
            raise ValueError(f"{where}gumbel_temperature = {self.gumbel_temperature} is impossible: set it to a "
                             "number >= 0 (0 = greedy)")
        if self.gumbel_schedule not in SCHEDULES:
            raise ValueError(f"{where}gumbel_schedule = {self.gumbel_schedule!r} is unknown: choose one of "
                             f"{', '.join(SCHEDULES)}")
        if self.random_first < 0:
            raise ValueError(f"{where}random_first = {self.random_first} is impossible: set it to >= 0")
        if self.precision not in PRECISIONS:
            raise ValueError(f"{where}precision = {self.precision!r} is unknown: choose one of {', '.join(PRECISIONS)}")
        if self.orders_per_image < 1:
            raise ValueError(f"{where}orders_per_image = {self.orders_per_image} is impossible: set it to an "
                             "integer >= 1 (1 = one order per image view)")


# The defaults (shared instances: the module keeps copies). `--print_config` shows every field. The callbacks'
# samples (FID, LPIPS, order heatmaps) take the order-choice noise this model samples best with (`sampler`).
DEFAULT_SAMPLER = SamplerSettings(choice_temperature=AUTO)
DEFAULT_EXTRACTION, DEFAULT_EDIT = ExtractionSettings(), EditSettings()


class AnyOrderModule(LightningModule):
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
        sampler: settings used by `generate` (callbacks, predict); its choice_temperature "auto" is the one
            this model samples best with (`auto_choice_temperature`).
        extraction: settings used by `predict` on training tokens.
        edit: settings used by `predict` to edit images (mask, target class, samples per image).
        predict_task: what `predict` does: sample (images for the requested labels, configs/sample.yaml)
            | extract (the order of each training image, configs/extract_orders.yaml) | edit (regenerate a
            masked region of real images, configs/edit.yaml).
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
                 extraction: ExtractionSettings = DEFAULT_EXTRACTION, edit: EditSettings = DEFAULT_EDIT,
                 predict_task: str = "sample",
                 tokenizer_ckpt: str | None = None, val_order_seed: int = 1234,
                 inferred_nll_every_n_epochs: int = 0, inferred_nll_batches: int = 2):
        super().__init__()
        if train_order not in ("raster", "random"):
            raise ValueError(f"model.init_args.train_order must be 'raster' or 'random', got {train_order!r}")
        if predict_task not in PREDICT_SPLITS:
            raise ValueError(f"model.init_args.predict_task must be one of {', '.join(PREDICT_SPLITS)}, "
                             f"got {predict_task!r}")
        self.save_hyperparameters()  # under the CLI: the whole config, so --ckpt_path rebuilds this module
        self.net, self.optimizer = net, optimizer
        if curriculum_steps < 0 or not 0.0 <= curriculum_start <= 1.0:
            raise ValueError("model.init_args.curriculum_steps must be >= 0 and curriculum_start in [0, 1], got "
                             f"{curriculum_steps} and {curriculum_start}")
        self.train_order, self.label_dropout = train_order, label_dropout
        self.curriculum_steps, self.curriculum_start = curriculum_steps, curriculum_start
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio
        self.sampler_settings = replace(sampler)  # as configured ("auto" kept): see `sampler`
        self.extraction, self.edit = replace(extraction), replace(edit)  # copies
        self.predict_task, self.tokenizer_ckpt = predict_task, tokenizer_ckpt
        self.val_order_seed = val_order_seed
        self.inferred_nll_every_n_epochs, self.inferred_nll_batches = inferred_nll_every_n_epochs, inferred_nll_batches
        self._draw_seed: int | None = None  # the seed of the training draws (see `train_generator`)
        self._draws = (-1, 0)  # (global step, batches drawn at it)
        # Frozen; a submodule, so checkpoints hold it too and stay self-contained.
        self.tokenizer = None if tokenizer_ckpt is None else \
            load_net(tokenizer_ckpt, what=TOKENIZER_WHAT, fix=TOKENIZER_FIX).requires_grad_(False)

    # ---- facts -----------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.net.num_classes

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.net.grid_size)

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
        what still draws from it (dropout) differs between ranks. The training draws use `train_generator`."""
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
        bits = nll_under_orders(self.net, tokens, cond, gen, inferred=inferred, score=self.extraction.score)
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

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record the network's spec and the tokenizer; keep hyper-parameters plain data (weights_only loads)."""
        checkpoint["net_spec"] = net_spec(self.net)
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

    # ---- generation and orders -------------------------------------------------------------------
    @property
    def sampler(self) -> SamplerSettings:
        """The sampler settings in use: choice_temperature "auto" becomes `auto_choice_temperature()`."""
        return self.sampler_settings.resolved(self.auto_choice_temperature())

    def auto_choice_temperature(self) -> float:
        """The order-choice noise this model samples best with: a model trained on random orders collapses
        to easy-first samples under the greedy choice and needs noise (docs/study.md)."""
        return NOISY_CHOICE_TEMPERATURE

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, generator: torch.Generator | None = None,
                 policy: str | None = None, choice_generator: torch.Generator | None = None) -> dict:
        """Sample images for `labels` with the configured sampler settings (`policy` overrides theirs).

        Args:
            labels: (b,) class labels.
            generator: draws the tokens (and random orders).
            policy: another order policy than the configured one.
            choice_generator: draws the order-choice noise (see `models.sampling.SamplerSettings`).

        Returns:
            dict with images uint8 (b,3,H,W), tokens (b,h,w), order (b,n), step_map (b,h,w), labels (b,).
        """
        if self.tokenizer is None:
            raise RuntimeError("no tokenizer to decode samples: pass tokenizer_ckpt (the CLI passes "
                               "data.init_args.tokenizer_ckpt)")
        settings = replace(self.sampler, policy=policy) if policy else self.sampler
        out = sample(self.net, labels.to(self.device), settings, generator=generator,
                     choice_generator=choice_generator)
        h, w = self.grid
        tokens = out.tokens.view(-1, h, w)
        images = self.tokenizer.to(self.device).decode_indices(tokens)
        images = images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
        return {"images": images, "tokens": tokens, "order": out.order,
                "step_map": order_to_step_map(out.order, h, w), "labels": labels}

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """What `predict_task` says: samples for the requested labels, the orders of training tokens, or edits."""
        return {"sample": self._sample, "extract": self._extract, "edit": self._edit}[self.predict_task](batch)

    def on_predict_start(self) -> None:
        """Editing: build (and so check) the masks before any work; warn when the order is new to the model."""
        if self.predict_task != "edit":
            return
        if self.tokenizer is None:
            raise RuntimeError("no tokenizer to edit with: pass tokenizer_ckpt (the CLI passes "
                               "data.init_args.tokenizer_ckpt)")
        h, _ = self.grid
        self._edit_masks = EditMasks(self.edit, self.grid, h * self.tokenizer.downsample)
        if self.train_order == "raster" and self.sampler.policy != "raster":
            log.warning("this model was trained on raster orders only, but model.init_args.sampler.policy is %s: "
                        "set it to raster to edit the standard way", self.sampler.policy)
        self.edit.placement(self.sampler.policy)  # a placement the policy cannot take fails here, before the data
        loaders = self.trainer.predict_dataloaders
        self._num_edit_images = len((loaders[0] if isinstance(loaders, (list, tuple)) else loaders).dataset)
        zero = torch.zeros(1, dtype=torch.long)
        edit_classes(self.edit, zero, zero, self.num_classes, self._num_edit_images)  # checks the target classes

    def _edit(self, batch: dict) -> dict:
        """Edits of `{"image", "label", "index", "position", "name"}` batches; one generator per batch, seeded."""
        seed = self.edit.seed + int(batch["position"][0])
        regenerate = self._edit_masks(batch["index"], list(batch["name"]))
        cond = edit_classes(self.edit, batch["label"], batch["position"], self.num_classes, self._num_edit_images)
        out = edit_images(self.net, self.tokenizer.to(self.device), batch["image"], regenerate, cond, self.sampler,
                          self.edit.placement(self.sampler.policy), self.edit.samples_per_image,
                          torch.Generator(device=self.device).manual_seed(seed), choice_generator(seed, self.device))
        return {**out, "inputs": batch["image"], "regenerate": regenerate, "labels": batch["label"], "targets": cond,
                "index": batch["index"], "names": list(batch["name"])}

    def _sample(self, batch: dict) -> dict:
        """Samples for `{"label", "seed"}` requests (`generate`'s dict); one generator per batch, seeded."""
        seed = int(batch["seed"][0])
        gen = torch.Generator(device=self.device).manual_seed(seed)
        return self.generate(batch["label"], generator=gen, choice_generator=choice_generator(seed, self.device))

    def _extract(self, batch: dict) -> dict:
        """`{"order": (b*K,n), "index", "flip", "k": (b*K,)}` for token batches, by teacher-forced greedy search.

        Each of the b views gets K rows (k = 0..K-1, view-major), one extraction pass over all b*K rows.
        """
        s, per = self.extraction, self.extraction.orders_per_image
        index, flip = batch["index"].repeat_interleave(per), batch["flip"].repeat_interleave(per)
        k = torch.arange(per, device=index.device).repeat(len(batch["index"]))
        seeds = noise_seeds(s.seed, index, flip, k)  # per image and k: any batching, same orders
        order = extract_orders(self.net, batch["tokens"].flatten(1).repeat_interleave(per, 0),
                               batch["label"].repeat_interleave(per), score=s.score,
                               positions_per_step=s.positions_per_step, gumbel_temperature=s.gumbel_temperature,
                               gumbel_schedule=s.gumbel_schedule, random_first=s.random_first, row_seeds=seeds,
                               dtype=resolve_dtype(s.precision, self.device))
        return {"order": order, "index": index, "flip": flip, "k": k}
