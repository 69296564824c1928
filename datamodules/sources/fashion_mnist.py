"""Fashion-MNIST read straight from its idx files, padded to 32x32 RGB.

The idx format is tiny (a magic number, big-endian dimension sizes, raw bytes), so it is parsed here
with gzip + numpy instead of going through torchvision's dataset class: the Debian package
`dataset-fashion-mnist` ships only the four .gz files, without torchvision's folder layout.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from datamodules.sources.base import DataSource

CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

_PREFIX = {"train": "train", "test": "t10k"}
_UBYTE = 0x08  # idx type code of unsigned bytes, the only one Fashion-MNIST uses
_PAD = 2  # 28 + 2 * 2 = 32, a size that halves cleanly through a tokenizer's downsampling


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """Read an idx file of unsigned bytes (gzip-compressed when its name ends in .gz).

    Args:
        path: The file.
        ndim: Expected number of dimensions (3 for images, 1 for labels).

    Returns:
        uint8 array with the file's dimensions.

    Raises:
        ValueError: The file is not a well-formed idx file of that shape.
    """
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:  # gzip raises these on a corrupt or truncated stream
        raise ValueError(f"cannot read {path}: {err}; delete it and fetch it again") from err
    expected_magic = bytes([0, 0, _UBYTE, ndim])
    if len(data) < 4 + 4 * ndim or data[:4] != expected_magic:
        raise ValueError(
            f"{path} is not an idx file of {ndim}-d unsigned bytes (magic {data[:4].hex()}, "
            f"expected {expected_magic.hex()}); delete it and fetch it again"
        )
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(
            f"{path} holds {body.size} bytes of data but its header says {shape}; "
            "the file is truncated or corrupt, delete it and fetch it again"
        )
    return body.reshape(shape)


def _find(folders: list[Path], name: str) -> Path | None:
    """The first of `name`.gz or `name` (uncompressed) found in `folders`."""
    for folder in folders:
        for candidate in (folder / f"{name}.gz", folder / name):
            if candidate.is_file():
                return candidate
    return None


class FashionMNISTSource(DataSource):
    """Fashion-MNIST: 28x28 grayscale clothes, zero-padded to 32x32 and repeated to 3 channels.

    Files are looked up in `root` and in `root/FashionMNIST/raw` (where torchvision puts them),
    compressed or not.

    Args:
        root: Folder holding the four idx files.
        split: "train" (60k images) or "test" (10k images).
        download: Fetch the files with torchvision when they are missing (needs internet).
    """

    num_classes = len(CLASS_NAMES)
    image_size = 28 + 2 * _PAD
    class_names = CLASS_NAMES

    def __init__(
        self,
        root: str = "/usr/share/datasets/fashion-mnist",
        split: str = "train",
        download: bool = False,
    ):
        if split not in _PREFIX:
            raise ValueError(f"split must be one of {sorted(_PREFIX)}, got {split!r}")
        self.root = Path(root)
        self.split = split
        paths = self._locate()
        if paths is None and download:
            from torchvision.datasets import FashionMNIST  # only needed on this path

            FashionMNIST(str(self.root), train=split == "train", download=True)
            paths = self._locate()
        if paths is None:
            raise FileNotFoundError(
                f"Fashion-MNIST {split} files not found under root={str(self.root)!r}: install them "
                "with `apt-get install dataset-fashion-mnist` (puts them in "
                "/usr/share/datasets/fashion-mnist), or set `download: true` (torchvision, needs "
                "internet), or point `root` at a folder holding the four .gz files"
            )
        self.image_path, self.label_path = paths
        self.images = read_idx(self.image_path, ndim=3)  # (N, 28, 28)
        self.labels = read_idx(self.label_path, ndim=1)  # (N,)
        if len(self.images) != len(self.labels) or self.images.shape[1:] != (28, 28):
            raise ValueError(
                f"{self.image_path} holds images of shape {self.images.shape} but {self.label_path} "
                f"holds {len(self.labels)} labels; expected (N, 28, 28) and N labels"
            )
        if self.labels.size and int(self.labels.max()) >= self.num_classes:
            raise ValueError(f"{self.label_path} has labels >= {self.num_classes}; is it Fashion-MNIST?")

    def _locate(self) -> tuple[Path, Path] | None:
        folders = [self.root, self.root / "FashionMNIST" / "raw"]
        prefix = _PREFIX[self.split]
        images = _find(folders, f"{prefix}-images-idx3-ubyte")
        labels = _find(folders, f"{prefix}-labels-idx1-ubyte")
        return (images, labels) if images is not None and labels is not None else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(np.pad(self.images[index], _PAD))  # (32, 32), zero border
        return image.expand(3, -1, -1).contiguous(), int(self.labels[index])

    def fingerprint(self) -> str:
        """Hash of the split and each file's path, size and modification time."""
        digest = hashlib.sha256(f"fashion-mnist|{self.split}|pad{_PAD}".encode())
        for path in (self.image_path, self.label_path):
            stat = path.stat()
            digest.update(f"|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        return digest.hexdigest()[:16]
