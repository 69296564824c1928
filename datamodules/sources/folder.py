"""Any folder of images as a source: classes from subfolders, resized and centre-cropped squares.

Layout: if any immediate subfolder of `root` holds images (at any depth), each such subfolder is a
class, named by the folder and numbered in sorted order; images lying directly in `root` are then
ignored (with a warning). Otherwise all images under `root` form one class, label 0.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from datamodules.sources.base import DataSource

log = logging.getLogger("oar.data")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# What PIL raises on unreadable, truncated or hostile files.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited on white.

    White rather than dropping alpha, because transparent pixels often hold arbitrary (frequently
    black) colour that was never meant to be seen; product photos on white are the common case.
    """
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grayscale: keep the high byte
        image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8))
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if has_alpha:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def load_image(path: Path) -> Image.Image:
    """Open and fully decode an image (PIL is lazy: truncation only shows on load)."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


def _is_readable(path: Path) -> bool:
    """Open, verify and decode the file once; verify() leaves the image unusable, hence two opens."""
    try:
        with Image.open(path) as image:
            image.verify()
        load_image(path)
    except _DECODE_ERRORS:
        return False
    return True


class ImageFolderSource(DataSource):
    """Images under a folder, recursively, as (uint8 (3, S, S), label) with S = `image_size`.

    Each image is resized so its shorter side is `image_size` (antialiased), then centre-cropped.

    Args:
        root: The folder.
        image_size: Side of the square output images.
        skip_bad_files: Check every file once at construction and leave out unreadable ones
            (counted in `num_skipped` and logged). Without it, a bad file raises when read.
        extensions: File name endings that count as images (case-insensitive).
    """

    def __init__(
        self,
        root: str,
        image_size: int = 32,
        skip_bad_files: bool = False,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ):
        self.root = Path(root)
        self.image_size = image_size
        self.skip_bad_files = skip_bad_files
        self.extensions = tuple(e.lower() for e in extensions)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder root={str(self.root)!r} does not exist; set `root` in the data config"
            )
        self.class_names, self.files, self.labels = self._scan()
        if not self.files:
            raise ValueError(
                f"no images ({', '.join(self.extensions)}) under root={str(self.root)!r}; "
                "set `root` in the data config to a folder of images"
            )
        # The fingerprint covers every file found, skipped ones included: fixing a bad file changes it.
        self._found = list(self.files)
        self.num_skipped = 0
        if skip_bad_files:
            keep = [i for i, path in enumerate(self.files) if _is_readable(path)]
            self.num_skipped = len(self.files) - len(keep)
            if self.num_skipped:
                log.warning("skipped %d unreadable image(s) under %s", self.num_skipped, self.root)
            self.files = [self.files[i] for i in keep]
            self.labels = [self.labels[i] for i in keep]
            if not self.files:
                raise ValueError(f"every image under root={str(self.root)!r} is unreadable; check `root`")
        self.num_classes = len(self.class_names)

    def _images_under(self, folder: Path) -> list[Path]:
        return sorted(p for p in folder.rglob("*") if p.suffix.lower() in self.extensions and p.is_file())

    def _scan(self) -> tuple[list[str], list[Path], list[int]]:
        """Find (class names, files, labels), with classes from subfolders when they hold images."""
        found = [(d.name, self._images_under(d)) for d in sorted(self.root.iterdir()) if d.is_dir()]
        classes = [(name, files) for name, files in found if files]
        empty = [name for name, files in found if not files]
        if classes and empty:  # a class with no images is no class: the labels of the others shift past it
            log.warning("class subfolder(s) %s of %s hold no images and are not classes (%d classes remain; a model "
                        "trained with them would see other label numbers)", ", ".join(empty), self.root, len(classes))
        if not classes:
            files = self._images_under(self.root)
            return [self.root.resolve().name or "images"], files, [0] * len(files)
        loose = [p for p in self.root.iterdir() if p.suffix.lower() in self.extensions and p.is_file()]
        if loose:
            log.warning(
                "ignoring %d image(s) directly in %s: classes are its subfolders",
                len(loose),
                self.root,
            )
        files = [path for _, paths in classes for path in paths]
        labels = [label for label, (_, paths) in enumerate(classes) for _ in paths]
        return [name for name, _ in classes], files, labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.files[index]
        try:
            image = load_image(path)
        except _DECODE_ERRORS as err:
            raise ValueError(
                f"cannot read image {path} ({err}); set skip_bad_files: true in the data config to skip it"
            ) from err
        tensor = F.pil_to_tensor(image)  # (3, h, w) uint8
        tensor = F.resize(tensor, [self.image_size], antialias=True)  # shorter side -> image_size
        tensor = F.center_crop(tensor, [self.image_size, self.image_size])
        return tensor.contiguous(), self.labels[index]

    def fingerprint(self) -> str:
        """Hash of `image_size` and each file's relative path, size and modification time.

        Taken afresh on every call (one stat per file), so edits after construction show up.
        """
        digest = hashlib.sha256(f"folder|{self.image_size}|{self.skip_bad_files}".encode())
        for path in self._found:
            stat = path.stat()
            digest.update(
                f"|{path.relative_to(self.root).as_posix()}|{stat.st_size}|{stat.st_mtime_ns}".encode()
            )
        return digest.hexdigest()[:16]
