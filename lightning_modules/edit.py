"""Editing (configs/edit.yaml): zero-shot inpainting, outpainting and class editing of real images with a trained
AR model (the settings and the work: `lightning_modules/editing.py`); `callbacks.edit_writer.EditWriter` writes them."""

import logging
from dataclasses import asdict, replace

import torch

from lightning_modules.editing import EditMasks, EditSettings, edit_classes, edit_images
from lightning_modules.predict import DEFAULT_SAMPLER, PredictModule
from models.sampling import SamplerSettings, choice_generator
from models.transformer import OrderedTransformer

log = logging.getLogger("oar.edit")
DEFAULT_EDIT = EditSettings()  # `--print_config` shows every field


class EditModule(PredictModule):
    """Edits of `{"image", "label", "index", "position", "name"}` batches; one generator per batch, seeded.

    Args:
        sampler: the sampler settings ("auto" follows the checkpoint's training: a raster model edits in raster order).
        edit: what is edited (mask, target class, samples per image, where the known cells go).
    """

    splits, writer, config = ("images_val", "images_train", "images_all"), "callbacks.edit_writer.EditWriter", \
        "configs/edit.yaml"
    parts = "edits.parts"

    def __init__(self, net: OrderedTransformer | None = None, checkpoint: str | None = None,
                 sampler: SamplerSettings = DEFAULT_SAMPLER, edit: EditSettings = DEFAULT_EDIT,
                 tokenizer_ckpt: str | None = None):
        super().__init__(net, checkpoint, tokenizer_ckpt)
        self.sampler_settings, self.edit = replace(sampler), replace(edit)
        self.net.check_order_policy(self.sampler.policy)
        self.edit.placement(self.sampler.policy)  # a placement the policy cannot take fails here, before the data

    @property
    def sampler(self) -> SamplerSettings:
        return self.trained.sampler(self.sampler_settings)

    def on_predict_start(self) -> None:
        """Build (and so check) the masks and target classes before any work; warn of an order new to the model."""
        self.decoder()
        h, _ = self.grid
        self._edit_masks = EditMasks(self.edit, self.grid, h * self.tokenizer.downsample)
        if self.trained.train_order == "raster" and self.sampler.policy != "raster":
            log.warning("this model was trained on raster orders only, but model.init_args.sampler.policy is %s: "
                        "set it to raster (or auto) to edit the standard way", self.sampler.policy)
        loaders = self.trainer.predict_dataloaders
        self._num_edit_images = len((loaders[0] if isinstance(loaders, (list, tuple)) else loaders).dataset)
        zero = torch.zeros(1, dtype=torch.long)
        edit_classes(self.edit, zero, zero, self.num_classes, self._num_edit_images)  # checks the target classes
        super().on_predict_start()

    def made_from(self) -> dict:
        return {**super().made_from(), "edit": asdict(self.edit), "images": self._num_edit_images,
                "data": self.trainer.datamodule.source.fingerprint()}

    def batch_identity(self, batch: dict) -> dict:
        return {"index": batch["index"].tolist(), "position": batch["position"].tolist(), "name": list(batch["name"])}

    def run_batch(self, batch: dict) -> dict:
        seed = self.edit.seed + int(batch["position"][0])
        regenerate = self._edit_masks(batch["index"], list(batch["name"]))
        cond = edit_classes(self.edit, batch["label"], batch["position"], self.num_classes, self._num_edit_images)
        out = edit_images(self.net, self.decoder(), batch["image"], regenerate, cond, self.sampler,
                          self.edit.placement(self.sampler.policy), self.edit.samples_per_image,
                          torch.Generator(device=self.device).manual_seed(seed), choice_generator(seed, self.device))
        return {**out, "inputs": batch["image"], "regenerate": regenerate, "labels": batch["label"], "targets": cond,
                "index": batch["index"], "names": list(batch["name"])}
