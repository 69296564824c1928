# Shapes: b batch, S samples per image, h/w token grid, n = h*w, H/W image size.
"""The editing job's settings and work (`lightning_modules.edit.EditModule`, configs/edit.yaml): zero-shot inpainting,
outpainting and class editing of real images.

An image is tokenized with the model's tokenizer, a mask names the cells to regenerate, and the sampler
writes only those, under the image's label or a `target_class`; the other cells keep the image's tokens.
Where the known cells go in the sequence (`known_cells`): `first` gives every generated cell all of them
(how an any-order model edits); `in_order` keeps each at its step of a fixed order, teacher-forced, so a
generated cell sees only the known cells before it (how a raster model edits: the baseline); `auto` is
`in_order` under the raster policy and `first` otherwise.

No Lightning here: `lightning_modules.edit.EditModule` calls these, and so does `experiments/editing.py`.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from datamodules.sources.folder import IMAGE_EXTENSIONS
from models.masks import (
    MASKS,
    WHERE,
    check_regenerated,
    generated_steps,
    image_mask_cells,
    random_cells,
    token_mask,
)
from models.policies import FIXED_POLICIES
from models.sampling import SamplerSettings, sample

KNOWN_CELLS = ("auto", "first", "in_order")


@dataclass
class EditSettings:
    """What `predict` edits (configs/edit.yaml; every key is `model.init_args.edit.<key>`).

    Attributes:
        mask: the cells regenerated: box | center | left | right | top | bottom (that half) | border (a frame
            of `border` cells: outpainting) | random (`random_share` of the cells) | image (`mask_path`).
        box: box: [left, top, right, bottom] (right/bottom exclusive), in `box_units`.
        box_units: fraction (of the image's side) | pixels.
        center_fraction: center: the centred box's side, as a share of the image's side.
        border: border: the frame's width in token cells.
        random_share: random: the share of cells regenerated (drawn per image from `seed` and its index).
        mask_path: image: a mask image (white = regenerate) for every image, or a folder with one per image,
            named like the image (`a/b.jpg` -> `<folder>/a/b.png`, any image format); the images' size.
        target_class: regenerate under this class (one for all images, or a list with one per image); None:
            each image's own label.
        samples_per_image: edits drawn per image.
        known_cells: auto | first | in_order (see the module docstring).
        seed: seed of the token draws (one generator per batch: seed + the batch's first position) and of
            the random masks.
    """

    mask: str = "center"
    box: list[float] | None = None
    box_units: str = "fraction"
    center_fraction: float = 0.5
    border: int = 1
    random_share: float = 0.5
    mask_path: str | None = None
    target_class: int | list[int] | None = None
    samples_per_image: int = 1
    known_cells: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            ("mask", self.mask in MASKS, f"one of {', '.join(MASKS)}"),
            ("known_cells", self.known_cells in KNOWN_CELLS, f"one of {', '.join(KNOWN_CELLS)}"),
            ("samples_per_image", self.samples_per_image >= 1, "an integer >= 1"),
            ("mask_path", (self.mask_path is not None) == (self.mask == "image"),
             "a mask image or folder exactly when mask is image"),
            ("target_class", all(c >= 0 for c in self.targets()), "a class index >= 0 (or a list of them)"),
        ]
        for key, ok, expected in checks:
            if not ok:
                raise ValueError(f"{WHERE}.{key} = {getattr(self, key)!r} is impossible: set it to {expected}")

    def targets(self) -> list[int]:
        """target_class as a list (empty when None)."""
        if self.target_class is None:
            return []
        return list(self.target_class) if isinstance(self.target_class, (list, tuple)) else [self.target_class]

    def placement(self, policy: str) -> str:
        """Where the known cells go under `policy`: first | in_order (refused for orders not fixed in advance)."""
        if self.known_cells == "auto":
            return "in_order" if policy == "raster" else "first"
        if self.known_cells == "in_order" and policy not in FIXED_POLICIES:
            raise ValueError(f"{WHERE}.known_cells = in_order keeps known cells at their step of a fixed order, but "
                             f"model.init_args.sampler.policy is {policy}: set the policy to raster or random, or "
                             "known_cells to first")
        return self.known_cells


# ------------------------------------------------------------------------------------------ masks
def read_mask_image(path: Path) -> Tensor:
    """A mask image as uint8 (H, W), grey levels (white = regenerate)."""
    try:
        with Image.open(path) as image:
            return torch.from_numpy(np.asarray(image.convert("L")).copy())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read mask image {path} ({err}): {WHERE}.mask_path must name PNG/JPEG masks") from err


class EditMasks:
    """The cells each image of a batch regenerates, from `EditSettings` (mask images read once).

    Args:
        edit: the settings.
        grid: (h, w) token grid.
        image_size: the images' side in pixels.
    """

    def __init__(self, edit: EditSettings, grid: tuple[int, int], image_size: int):
        self.edit, self.grid, self.image_size = edit, tuple(grid), image_size
        self.fixed = self.one_for_all = None
        if edit.mask == "image":
            path = Path(edit.mask_path)
            if not path.exists():
                raise FileNotFoundError(f"{WHERE}.mask_path {str(path)!r} does not exist: give a mask image (white = "
                                        "regenerate) or a folder of them named like the images")
            if path.is_file():
                self.one_for_all = self._cells(read_mask_image(path), path)
        elif edit.mask == "random":
            random_cells(self.grid, edit.random_share, edit.seed, torch.zeros(1, dtype=torch.long))  # checks the share
        else:
            self.fixed = token_mask(edit.mask, self.grid, image_size, box=edit.box, box_units=edit.box_units,
                                    center_fraction=edit.center_fraction, border=edit.border)
            check_regenerated(self.fixed[None], f"{WHERE}.mask = {edit.mask}")

    def _cells(self, mask: Tensor, path: Path) -> Tensor:
        """A mask image's cells (h, w), refused when it has another size than the images or is empty or full."""
        if tuple(mask.shape) != (self.image_size, self.image_size):
            raise ValueError(f"mask image {path} is {mask.shape[1]}x{mask.shape[0]} pixels, but the images are "
                             f"{self.image_size}x{self.image_size} (data.init_args.source.init_args.image_size): "
                             "give masks of the images' size")
        cells = image_mask_cells(mask, self.grid, f"mask image {path}")
        check_regenerated(cells[None], f"mask image {path}")
        return cells

    def mask_file(self, name: str) -> Path:
        """The mask of image `name` (its path under the data root) in the mask folder, any image extension."""
        stem = Path(self.edit.mask_path) / Path(name).with_suffix("")
        for ext in IMAGE_EXTENSIONS:
            for candidate in (stem.with_name(stem.name + ext), stem.with_name(stem.name + ext.upper())):
                if candidate.is_file():
                    return candidate
        raise FileNotFoundError(f"no mask for image {name} in {WHERE}.mask_path {self.edit.mask_path}: add "
                                f"{stem}.png (white = regenerate)")

    def __call__(self, index: Tensor, names: list[str]) -> Tensor:
        """The regenerated cells (b, h, w) bool of the images with dataset indices `index` (b,) and `names`."""
        b = len(index)
        if self.fixed is not None:
            return self.fixed.expand(b, *self.grid).to(index.device)
        if self.one_for_all is not None:
            return self.one_for_all.expand(b, *self.grid).to(index.device)
        if self.edit.mask == "random":
            return random_cells(self.grid, self.edit.random_share, self.edit.seed, index)
        return torch.stack([self._cells(read_mask_image(p), p) for p in map(self.mask_file, names)]).to(index.device)


def edit_classes(edit: EditSettings, labels: Tensor, position: Tensor, num_classes: int, num_images: int) -> Tensor:
    """The class (b,) each image is regenerated under: its label, or the target class (one, or one per position).

    Raises:
        ValueError: a target class the model does not have, or a list of another length than the images.
    """
    targets = edit.targets()
    if not targets:
        return labels
    if num_classes == 0:
        raise ValueError(f"{WHERE}.target_class = {edit.target_class!r}, but the model is unconditional (no classes): "
                         "drop target_class")
    if max(targets) >= num_classes:
        raise ValueError(f"{WHERE}.target_class = {edit.target_class!r} names a class the model does not have: "
                         f"use 0..{num_classes - 1}")
    if len(targets) == 1:
        return torch.full_like(labels, targets[0])
    if len(targets) != num_images:
        raise ValueError(f"{WHERE}.target_class lists {len(targets)} classes for {num_images} images: give one per "
                         "image (in the order of the predict split), or a single class")
    return torch.tensor(targets, device=labels.device)[position]


# ------------------------------------------------------------------------------------------- edits
def to_uint8(images: Tensor) -> Tensor:
    """Images in [-1, 1] -> uint8 in [0, 255]."""
    return images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


@torch.no_grad()
def edit_images(net, tokenizer, images: Tensor, regenerate: Tensor, cond: Tensor, settings: SamplerSettings,
                placement: str = "first", samples: int = 1, generator: torch.Generator | None = None,
                choice_generator: torch.Generator | None = None) -> dict:
    """Regenerate the masked cells of each image, `samples` times, keeping the others' tokens.

    Args:
        net: the ordered transformer (eval mode).
        tokenizer: the VQ tokenizer the net was trained on.
        images: uint8 (b, 3, H, W).
        regenerate: (b, h, w) bool, the cells to regenerate (rows may differ).
        cond: (b,) the class each image is regenerated under.
        settings: the sampler settings (policy, temperature, CFG, precision, ...).
        placement: where the known cells go: first | in_order (fixed orders only).
        samples: edits per image.
        generator, choice_generator: the token draws and the order-choice noise.

    Returns:
        dict: tokens_in (b, h, w); outputs uint8 (b, S, 3, H, W); tokens (b, S, h, w); step_maps (b, S, h, w)
        (the rank at which each regenerated cell was written, -1 for kept cells); reconstructions uint8
        (b, 3, H, W) (the input's tokens decoded: what the kept cells look like after the tokenizer).
    """
    b, (h, w) = images.shape[0], net.grid_size
    tokens_in = tokenizer.encode(images.float().div(127.5).sub(1.0))  # (b, h, w)
    rows = lambda x: x.repeat_interleave(samples, dim=0)  # noqa: E731  (b * S, ...): each image S times
    out = sample(net, rows(cond), settings, generator=generator, choice_generator=choice_generator,
                 known_tokens=rows(tokens_in), known_mask=rows(~regenerate), known_placement=placement)
    tokens = out.tokens.view(b * samples, h, w)
    outputs = to_uint8(tokenizer.decode_indices(tokens))
    steps = generated_steps(out.order, rows(regenerate).flatten(1))
    return {"tokens_in": tokens_in, "outputs": outputs.view(b, samples, *outputs.shape[1:]),
            "tokens": tokens.view(b, samples, h, w), "step_maps": steps.view(b, samples, h, w),
            "reconstructions": to_uint8(tokenizer.decode_indices(tokens_in))}
