"""Log originals above their tokenizer reconstructions to TensorBoard after validation.

Modified from: https://github.com/Lightning-AI/pytorch-lightning/blob/master/examples/pytorch/basics/autoencoder.py
(`ImageSampler`: a callback that runs the module's network and logs a `make_grid` image).
"""

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torchvision.utils import make_grid

from callbacks.tensorboard import tensorboard_writer


class ReconstructionGrid(Callback):
    """Every `every_n_epochs` validation epochs, log the first val images and their reconstructions.

    The grid has two rows: originals, then `decode_indices(encode(x))` (what the AR stages will see).
    Only rank 0 logs, and only to a `TensorBoardLogger`.

    Args:
        every_n_epochs: log on epochs whose index is a multiple of this.
        num_images: how many images of the first validation batch to show.
    """

    def __init__(self, every_n_epochs: int = 1, num_images: int = 16) -> None:
        super().__init__()
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self._images: torch.Tensor | None = None

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs,
        batch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx == 0 and dataloader_idx == 0 and isinstance(batch, dict) and "image" in batch:
            self._images = batch["image"][: self.num_images].detach()

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        images, self._images = self._images, None
        if images is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        if trainer.current_epoch % self.every_n_epochs:
            return
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        # encode/decode_indices never touch the codebook, so this is safe whatever the module's mode.
        with torch.no_grad():
            recon = pl_module.net.decode_indices(pl_module.net.encode(images))
        grid = make_grid(torch.cat([images, recon]), nrow=len(images), value_range=(-1, 1), normalize=True)
        writer.add_image("val/reconstructions", grid, global_step=trainer.global_step)
