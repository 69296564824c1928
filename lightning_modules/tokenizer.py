"""Stage 0: train the VQ tokenizer (reconstruction + VQ losses, optional LPIPS and patch-GAN terms).

Shapes: b batch, c channels, H/W image size, v codebook size.
"""

import pickle
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.image import PeakSignalNoiseRatio

from evaluation.lpips import build_lpips as load_lpips
from lightning_modules import learning_rate
from models.checkpoint import net_spec
from models.discriminator import PatchDiscriminator, g_loss, hinge_d_loss
from models.tokenizer import VQAutoencoder, VQOutput

STAGES = ("train", "val", "test")


class CodebookUsage(Metric):
    """Share of codes used at least once over the epoch, summed over DDP ranks before computing."""

    full_state_update = False

    def __init__(self, codebook_size: int) -> None:
        super().__init__()
        self.add_state("counts", torch.zeros(codebook_size), dist_reduce_fx="sum")

    def update(self, usage: Tensor) -> None:
        self.counts += usage.to(self.counts.dtype)

    def compute(self) -> Tensor:
        return (self.counts > 0).float().mean()


def build_lpips(weights_path: str | None) -> nn.Module:
    """LPIPS-VGG from torchmetrics, with the VGG16 ImageNet backbone taken from `weights_path` if given.

    torchmetrics ships LPIPS's linear heads (`lpips_models/vgg.pth`) but gets the backbone from
    torchvision, which reads `<torch hub dir>/checkpoints/vgg16-397923af.pth` and downloads it when
    missing. A local copy is honoured by pointing torch hub at a temporary folder that links to it.
    """
    from torchvision.models import VGG16_Weights

    expected = Path(urlparse(VGG16_Weights.DEFAULT.url).path).name
    hint = (
        f"LPIPS needs the torchvision VGG16 ImageNet weights ({expected}): set lpips_weights_path to a "
        "local copy, or perceptual_weight: 0 to disable the perceptual loss"
    )
    if weights_path is None:
        try:
            return load_lpips("vgg", normalize=False)
        except (OSError, RuntimeError) as err:  # URLError is an OSError: offline and not cached
            raise RuntimeError(f"{hint} ({err})") from err
    path = Path(weights_path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{hint} (no file at lpips_weights_path={weights_path})")
    try:
        return load_lpips("vgg", str(path), normalize=False)
    except (OSError, RuntimeError, pickle.UnpicklingError) as err:
        raise RuntimeError(f"{hint} ({weights_path} could not be loaded: {err})") from err


class TokenizerModule(LightningModule):
    """Thin adapter that trains a `VQAutoencoder` on `batch["image"]` in [-1, 1].

    Loss = MSE + L1 (reconstruction) + commit_weight * (commitment + codebook)
    + perceptual_weight * LPIPS + gan_weight * hinge generator loss (after `gan_start_step`).
    With gan_weight > 0 the module switches to manual optimisation (generator step, then
    discriminator step, in one `training_step`); Lightning then counts both optimizer steps in
    `global_step`, so once the GAN is on, `max_steps` advances by two per batch.

    Args:
        net: the tokenizer network.
        optimizer: optimizer factory (lr etc. in its YAML init_args); also used for the discriminator.
        perceptual_weight: weight of the LPIPS-VGG loss; 0 disables it (no weights needed).
        lpips_weights_path: local torchvision VGG16 ImageNet weights (vgg16-397923af.pth) for offline use.
        gan_weight: weight of the patch-GAN generator loss; 0 disables the GAN.
        discriminator: patch discriminator; a default `PatchDiscriminator` when gan_weight > 0 and none given.
        gan_start_step: global step from which the GAN terms are trained.
        commit_weight: weight of the commitment + codebook losses.
    """

    def __init__(
        self,
        net: VQAutoencoder,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        perceptual_weight: float = 0.0,
        lpips_weights_path: str | None = None,
        gan_weight: float = 0.0,
        discriminator: PatchDiscriminator | None = None,
        gan_start_step: int = 2000,
        commit_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer", "discriminator"])
        self.net = net
        self.optimizer = optimizer
        self.lpips = build_lpips(lpips_weights_path) if perceptual_weight > 0 else None
        if gan_weight > 0 and discriminator is None:
            discriminator = PatchDiscriminator(in_channels=net.init_args["in_channels"])
        self.discriminator = discriminator if gan_weight > 0 else None
        self.automatic_optimization = self.discriminator is None
        # One metric object per stage ("train" cannot be a ModuleDict key: it is an nn.Module method).
        for stage in STAGES:
            setattr(self, f"{stage}_psnr", PeakSignalNoiseRatio(data_range=1.0))
            setattr(self, f"{stage}_usage", CodebookUsage(net.vocab_size))

    def _gan_active(self) -> bool:
        return self.discriminator is not None and self.global_step >= self.hparams.gan_start_step

    def _step(self, batch: dict, stage: str) -> tuple[Tensor, VQOutput]:
        """Generator losses for one batch, logged under `stage`; returns (loss, net output)."""
        images = batch["image"]
        out = self.net(images)
        losses = {
            "rec_loss": F.mse_loss(out.recon, images) + F.l1_loss(out.recon, images),
            "commit_loss": out.commit_loss,
            "codebook_loss": out.codebook_loss,
        }
        loss = losses["rec_loss"] + self.hparams.commit_weight * (out.commit_loss + out.codebook_loss)
        if self.lpips is not None:
            # torchmetrics rejects inputs below -1; the clamp only stops gradients outside [-1, 1].
            losses["perceptual_loss"] = self.lpips(out.recon.clamp(-1, 1), images)
            loss = loss + self.hparams.perceptual_weight * losses["perceptual_loss"]
        if self._gan_active():
            losses["g_loss"] = g_loss(self.discriminator(out.recon))
            loss = loss + self.hparams.gan_weight * losses["g_loss"]
        losses["loss"] = loss
        # Per step in training; per epoch, averaged over DDP ranks, in validation.
        train = stage == "train"
        how = dict(on_step=train, on_epoch=not train, sync_dist=not train)
        for name, value in losses.items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "loss", **how)
        self.log(f"{stage}/perplexity", out.perplexity, **how)
        psnr, usage = getattr(self, f"{stage}_psnr"), getattr(self, f"{stage}_usage")
        psnr.update((out.recon.detach().clamp(-1, 1) + 1) / 2, (images + 1) / 2)
        self.log(f"{stage}/psnr", psnr, on_step=False, on_epoch=True, prog_bar=stage == "val")
        usage.update(out.usage)
        self.log(f"{stage}/codebook_usage", usage, on_step=False, on_epoch=True)
        return loss, out

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        train_d = self._gan_active()  # read before opt_g.step() moves global_step
        loss, out = self._step(batch, "train")
        if self.automatic_optimization:
            return loss
        opt_g, opt_d = self.optimizers()
        opt_g.zero_grad()
        self.manual_backward(loss)
        opt_g.step()
        if train_d:
            # Detached inputs: the discriminator step must not reach the tokenizer.
            logits_real = self.discriminator(batch["image"].detach())
            logits_fake = self.discriminator(out.recon.detach())
            d_loss = hinge_d_loss(logits_real, logits_fake)
            opt_d.zero_grad()  # also drops the grads the generator loss left on the discriminator
            self.manual_backward(d_loss)
            opt_d.step()
            self.log("train/d_loss", d_loss, on_step=True)
        return None

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "val")[0]

    def test_step(self, batch: dict, batch_idx: int) -> Tensor:
        """The validation metrics on the DataModule's test split (its validation images), as test/..."""
        return self._step(batch, "test")[0]

    def configure_optimizers(self):
        optimizers = [self.optimizer(self.net.parameters())]
        if self.discriminator is not None:
            optimizers.append(self.optimizer(self.discriminator.parameters()))
        learning_rate.remember(self, optimizers)
        return optimizers[0] if len(optimizers) == 1 else optimizers

    def on_train_start(self) -> None:
        learning_rate.restore_configured(self)  # a resumed fit keeps the configured learning rate

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["net_spec"] = net_spec(self.net)
