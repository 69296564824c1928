"""The predict jobs on a trained AR checkpoint, one small LightningModule each: sampling (`SampleModule`,
configs/sample.yaml), order extraction (`lightning_modules.extract.ExtractModule`, configs/extract_orders.yaml) and
editing (`lightning_modules.edit.EditModule`, configs/edit.yaml).

A job reads its checkpoint itself (`checkpoint`: the CLI passes `--ckpt_path` here, and Lightning restores nothing):
the network (built from the spec the file records, a class of the project's own), what its training was (`Trained`:
the stage, the training order and the order-choice noise it samples best with, read as plain data) and its tokenizer
record. It runs over the predict split its job names (`splits`) and its results are written by one writer callback
(`writer`); `setup` checks both, and the data's tokenizer and classes against the checkpoint, before any work.

Sampling and editing keep each finished batch in `<run folder>/<job>.parts/` (`fileio.batch_shards`, keyed by the
checkpoint's content, the settings and the data): a stopped job's rerun skips them and writes the files an
uninterrupted run writes (each batch's generators are seeded by the batch itself); a finished job removes them.
"""

import logging
from dataclasses import asdict, dataclass, replace

import torch
from lightning.pytorch import LightningModule

from callbacks.tensorboard import run_folder
from evaluation.sampling import sample_images
from fileio import file_sha256
from fileio.batch_shards import BatchShards
from lightning_modules.checkpoint_checks import check_trained_classes, check_trained_tokenizer
from models.checkpoint import load_net, load_weights_into, net_from_checkpoint, read_checkpoint
from models.sampling import AUTO, NOISY_CHOICE_TEMPERATURE, SamplerSettings, choice_generator
from models.transformer import OrderedTransformer

log = logging.getLogger("oar.predict")

CKPT_WHAT = "checkpoint (--ckpt_path)"
CKPT_FIX = "pass a checkpoint written by `python run.py fit` of this stage (runs/<stage>/checkpoints/*.ckpt)"
TOKENIZER_WHAT = "tokenizer checkpoint (data.init_args.tokenizer_ckpt)"
TOKENIZER_FIX = "make it with `python run.py fit --config configs/tokenizer.yaml`"
TRAINED_DATA_FIX = ("give it the data it was trained on: the tokenizer it records (unset data.init_args.tokenizer_ckpt)"
                    " and the same classes and image size")
# The callbacks' and sample.yaml's sampler: policy and order-choice noise as the checkpoint's training suits.
DEFAULT_SAMPLER = SamplerSettings(policy=AUTO, choice_temperature=AUTO)


@dataclass(frozen=True)
class Trained:
    """What an AR checkpoint says of its training, read as plain data (nothing it names is imported).

    Attributes:
        stage: the class name of the module that trained it (AnyOrderModule, DistillModule).
        train_order: raster | random: the orders of its (stage-1) training.
        choice_temperature: the order-choice noise it samples best with (`choice_temperature: auto`): a model
            trained on random orders collapses to easy-first samples under the greedy choice and needs noise; a
            model distilled on its own orders samples best greedily (docs/study.md, sections 2d and 2e).
    """

    stage: str = "AnyOrderModule"
    train_order: str = "random"
    choice_temperature: float = NOISY_CHOICE_TEMPERATURE

    @classmethod
    def of(cls, ckpt: dict) -> "Trained":
        """From the checkpoint's `trained` record, or (written before it existed) its hyper-parameters."""
        record = ckpt.get("trained")
        if isinstance(record, dict):
            return cls(str(record["stage"]), str(record["train_order"]), float(record["choice_temperature"]))
        hp = ckpt.get("hyper_parameters") or {}
        stage = str(hp.get("_class_path", "AnyOrderModule")).rpartition(".")[2]
        own_orders = stage == "DistillModule" and float(hp.get("random_order_prob", 0.2)) < 1.0
        return cls(stage, str(hp.get("train_order", "random")), 0.0 if own_orders else NOISY_CHOICE_TEMPERATURE)

    def record(self) -> dict:
        return {"stage": self.stage, "train_order": self.train_order, "choice_temperature": self.choice_temperature}

    def sampler(self, settings: SamplerSettings) -> SamplerSettings:
        """`settings` with policy and choice_temperature "auto" made concrete: a raster model writes in raster
        order, any other model in confidence order, with the noise it samples best with."""
        policy = ("raster" if self.train_order == "raster" else "confidence") if settings.policy == AUTO \
            else settings.policy
        return replace(settings, policy=policy).resolved(self.choice_temperature)


def frozen_tokenizer(tokenizer_ckpt: str | None):
    """The tokenizer that decodes an AR module's tokens, frozen; a submodule, so checkpoints hold it (None: none)."""
    if tokenizer_ckpt is None:
        return None
    return load_net(tokenizer_ckpt, what=TOKENIZER_WHAT, fix=TOKENIZER_FIX).requires_grad_(False)


class ARFacts:
    """What an AR module knows of its network: the classes and the token grid."""

    @property
    def num_classes(self) -> int:
        return self.net.num_classes

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.net.grid_size)


class PredictModule(ARFacts, LightningModule):
    """The base of the predict jobs: a trained AR network (frozen), its training facts and its tokenizer.

    Args:
        net: the network the checkpoint records (the CLI builds it from the checkpoint's spec, with the data's
            facts linked in); None: built from the checkpoint here.
        checkpoint: the trained AR checkpoint (the CLI passes `--ckpt_path` here).
        tokenizer_ckpt: the tokenizer that decodes tokens (the CLI passes data.init_args.tokenizer_ckpt, or the
            tokenizer the checkpoint records); None where the job needs none (extraction).
    """

    splits: tuple[str, ...] = ()  # the DataModule predict splits the job runs over
    writer = ""  # the class path of the callback that writes its results
    config = ""  # the stage config of the job
    parts = ""  # the folder (in the writer's) of its finished batches, so a stopped job resumes; "": none

    def __init__(self, net: OrderedTransformer | None = None, checkpoint: str | None = None,
                 tokenizer_ckpt: str | None = None):
        super().__init__()
        if checkpoint is None:
            raise ValueError(f"{self.config} needs a trained AR model: pass --ckpt_path runs/any_order/checkpoints/"
                             "last.ckpt (or another fit's checkpoint)")
        ckpt = read_checkpoint(checkpoint, CKPT_WHAT, CKPT_FIX)
        # A network built by the CLI (the data's facts linked in) gets its weights in `setup`, after the data checks
        # name any mismatch in their own words; one built here from the checkpoint's spec has them now.
        self._pending = None if net is None else ckpt
        net = net_from_checkpoint(ckpt, checkpoint, CKPT_WHAT, CKPT_FIX) if net is None else net
        self.net = net.eval().requires_grad_(False)
        self.checkpoint, self.trained = str(checkpoint), Trained.of(ckpt)
        self._facts = {"tokenizer": ckpt.get("tokenizer"), "net_spec": ckpt["net_spec"]}  # for the data checks
        self.tokenizer, self.tokenizer_ckpt = frozen_tokenizer(tokenizer_ckpt), tokenizer_ckpt
        self._shards: BatchShards | None = None

    def setup(self, stage: str) -> None:
        """Before any work: the job's split and writer, and the data against what the checkpoint was trained on."""
        if stage != "predict":
            raise ValueError(f"{self.config} only predicts: run `python run.py predict --config {self.config} "
                             "--ckpt_path <checkpoint>`")
        dm = self.trainer.datamodule
        split = getattr(dm, "predict_split", None)
        if split not in self.splits:
            raise ValueError(f"{self.config} runs over data.init_args.predict_split {' or '.join(self.splits)}, "
                             f"not {split}: set it to one of them (or drop the override)")
        callbacks = {f"{type(c).__module__}.{type(c).__qualname__}": c for c in self.trainer.callbacks}
        if self.writer not in callbacks:
            raise ValueError(f"{self.config} writes its results with {self.writer}: keep it in trainer.callbacks")
        self._writer_folder = getattr(callbacks[self.writer], "out_dir", None)
        what = f"{self.checkpoint} (--ckpt_path)"
        check_trained_tokenizer(self._facts, what, dm)
        check_trained_classes(self._facts, what, dm)
        self.weights()

    def weights(self) -> None:
        """Load the checkpoint's weights into a network given to the constructor (once; `setup` does it)."""
        if self._pending is not None:
            load_weights_into(self.net, self._pending, self.checkpoint, CKPT_WHAT, TRAINED_DATA_FIX)
            self._pending = None

    # ---- resuming from finished batches ----------------------------------------------------------------------------
    def on_predict_start(self) -> None:
        if self.parts:  # every rank: the run folder is a collective under DDP
            folder = run_folder(self.trainer, self._writer_folder) / self.parts
            self._shards = BatchShards(folder, self.made_from())

    def made_from(self) -> dict:
        """What the job's results depend on besides the batch itself: its key of finished batches."""
        tokenizer = file_sha256(self.tokenizer_ckpt) if self.tokenizer_ckpt else None  # the file it was loaded from
        return {"job": type(self).__name__, "checkpoint": file_sha256(self.checkpoint), "tokenizer": tokenizer,
                "sampler": asdict(self.sampler), "device": self.device.type}

    def batch_identity(self, batch: dict):
        """What makes a batch this batch (plain values); jobs with `parts` say."""
        raise NotImplementedError

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """The job's work on the batch (`run_batch`), or its outputs from the run that finished it before."""
        self.weights()
        if self._shards is None:
            return self.run_batch(batch)
        identity = self.batch_identity(batch)
        done = self._shards.load(identity)
        if done is not None:
            return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in done.items()}
        out = self.run_batch(batch)
        self._shards.save(identity, out)
        return out

    def run_batch(self, batch: dict) -> dict:
        """The job's work on one batch; every job says."""
        raise NotImplementedError

    def on_predict_end(self) -> None:
        """After the writer's files: the finished batches are no longer needed (a stopped run never gets here)."""
        if self._shards is None:
            return
        if self._shards.loaded:
            log.info("%d batches came from the shards of an earlier, stopped run (%s)", self._shards.loaded,
                     self._shards.folder)
        self.trainer.strategy.barrier("PredictModule.shards")
        if self.trainer.is_global_zero:
            self._shards.clear()

    def decoder(self):
        """The tokenizer, on this module's device (a job that decodes needs one)."""
        if self.tokenizer is None:
            raise RuntimeError("no tokenizer to decode with: pass tokenizer_ckpt (the CLI passes "
                               "data.init_args.tokenizer_ckpt)")
        return self.tokenizer.to(self.device)


class SampleModule(PredictModule):
    """Samples images for `{"label", "seed"}` requests (configs/sample.yaml): one generator per batch, seeded.

    Args:
        sampler: the sampler settings; policy and choice_temperature "auto" follow the checkpoint's training
            (`Trained.sampler`).
    """

    splits, writer, config, parts = ("samples",), "callbacks.writers.SampleWriter", "configs/sample.yaml", \
        "samples.parts"

    def __init__(self, net: OrderedTransformer | None = None, checkpoint: str | None = None,
                 sampler: SamplerSettings = DEFAULT_SAMPLER, tokenizer_ckpt: str | None = None):
        super().__init__(net, checkpoint, tokenizer_ckpt)
        self.sampler_settings = replace(sampler)
        self.net.check_order_policy(self.sampler.policy)

    @property
    def sampler(self) -> SamplerSettings:
        """The settings in use ("auto" made concrete)."""
        return self.trained.sampler(self.sampler_settings)

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, generator: torch.Generator | None = None, policy: str | None = None,
                 choice_generator: torch.Generator | None = None) -> dict:
        """Sample images for `labels` (b,) (`evaluation.sampling.sample_images`; `policy` overrides the settings')."""
        self.weights()
        settings = replace(self.sampler, policy=policy) if policy else self.sampler
        return sample_images(self.net, self.decoder(), labels.to(self.device), settings, generator, choice_generator)

    def batch_identity(self, batch: dict) -> dict:
        return {"seed": batch["seed"].tolist(), "label": batch["label"].tolist()}

    def run_batch(self, batch: dict) -> dict:
        seed = int(batch["seed"][0])
        gen = torch.Generator(device=self.device).manual_seed(seed)
        return self.generate(batch["label"], generator=gen, choice_generator=choice_generator(seed, self.device))
