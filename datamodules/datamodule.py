"""The one DataModule of every stage: images (tokenizer), token grids (AR stages), orders (distillation).

Image mode (no `tokenizer_ckpt`) yields `{"image", "label", "index"}`; token mode yields
`{"tokens", "label", "index", "flip"}` read from a token cache made once from the tokenizer checkpoint,
plus `"order"` when an orders file is given. Vocabulary size, token grid and number of classes are
exposed as attributes so the CLI links them into the networks (they are never typed twice).
"""

import logging
import math
import signal
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from datamodules.orders_file import finished_views, load_orders
from datamodules.token_cache import (
    IMAGE_SIZE_KEY,
    cache_path,
    ensure_token_cache,
    load_token_cache,
    manifest_for,
    tokenizer_facts,
)
from models.checkpoint import UnreadableFileError

log = logging.getLogger("oar.data")

TOKENIZER_HINT = "make it with `python run.py fit --config configs/tokenizer.yaml`"
IMAGE_SPLITS = "images_"  # predict splits of images as they are (editing): images_val, images_train, images_all
PREDICT_SPLITS = ("samples", "train", "val", "images_val", "images_train", "images_all")


class ImageSplit(Dataset):
    """Images of one split scaled to [-1, 1], optionally mirrored at random (training only)."""

    def __init__(self, source: Dataset, indices: torch.Tensor, flip: bool):
        self.source, self.indices, self.flip = source, indices, flip

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        index = int(self.indices[i])
        image, label = self.source[index]
        x = image.float().div(127.5).sub(1.0)
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return {"image": x, "label": int(label), "index": index}


class TokenSplit(Dataset):
    """Token grids of one split; with flips, a random one of the two cached views (training only).

    With orders (N, F, K, n) (distillation), each item carries the order of its view, one of the view's
    K orders drawn at random when K > 1 (by the global RNG, as the flip: the DataLoader's randomness).
    """

    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, flip: bool,
                 orders: torch.Tensor | None = None):
        self.tokens, self.labels, self.indices, self.flip, self.orders = tokens, labels, indices, flip, orders

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        index = int(self.indices[i])
        f = int(torch.randint(self.tokens.shape[1], ())) if self.flip else 0
        item = {"tokens": self.tokens[index, f].long(), "label": int(self.labels[index]), "index": index,
                "flip": f}
        if self.orders is not None:
            per = self.orders.shape[2]
            k = int(torch.randint(per, ())) if per > 1 else 0  # K = 1 draws nothing: the same stream as before K
            item["order"] = self.orders[index, f, k].long()
        return item


class TokenViews(Dataset):
    """Given (image, view) keys in a fixed order: what order extraction runs over (K orders each).

    `pad` flags repeats added only so every process gets an item; the order writer drops them.
    """

    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor, keys: list[tuple[int, int]], pad: list[int]):
        self.tokens, self.labels, self.keys, self.pad = tokens, labels, keys, pad

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict:
        index, f = self.keys[i]
        return {"tokens": self.tokens[index, f].long(), "label": int(self.labels[index]), "index": index,
                "flip": f, "pad": self.pad[i]}


class ImageItems(Dataset):
    """Images of a split as they are (uint8 (3,H,W)), with label, dataset index, position in the split and name
    (the file's path under a folder source's root, else the index): what editing runs over."""

    def __init__(self, source: Dataset, indices: torch.Tensor):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        index = int(self.indices[i])
        image, label = self.source[index]
        files, root = getattr(self.source, "files", None), getattr(self.source, "root", None)
        name = f"{index:06d}" if files is None or root is None else Path(files[index]).relative_to(root).as_posix()
        return {"image": image, "label": int(label), "index": index, "position": i, "name": name}


def leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """A DataLoader worker ignores SIGTERM and SIGINT, which a signal to the whole process group also sends it.

    Killed by it (torch's default), the lost worker would crash the main process at once; the main process instead
    stops at the next step boundary (callbacks/preemption.py) and shuts its workers down as it exits.
    """
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


class SampleRequests(Dataset):
    """Labels (cycling over the classes) and seeds of the images `predict` samples."""

    def __init__(self, num: int, num_classes: int, seed: int):
        self.num, self.num_classes, self.seed = num, max(1, num_classes), seed

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, i: int) -> dict:
        return {"label": i % self.num_classes, "seed": self.seed + i}


class OARDataModule(LightningDataModule):
    """Shared data for the tokenizer, any-order AR and distillation stages.

    Args:
        source: a dataset of `(uint8 image (3,H,W), label)` with `num_classes`, `image_size` and
            `fingerprint()`; the synthetic sunsets by default.
        batch_size: per-process batch size.
        val_fraction: share of images held out for validation (deterministic by `split_seed`).
        split_seed: seed of the train/val split.
        num_workers: DataLoader workers for image mode and for building the token cache (token mode reads the
            memory-mapped cache in the main process).
        flip: random horizontal flips in training; in token mode both views are cached.
        tokenizer_ckpt: tokenizer checkpoint; switches to token mode and names the token cache.
        cache_dir: where token caches live.
        tokenize_batch_size: batch size used to build the token cache.
        max_val_images: cap on validation images (keeps validation cheap on large sets).
        orders_path: folder of extracted orders: written by order extraction (`predict` with
            predict_split train), read by the distillation stage.
        predict_split: what `predict` runs over: samples (sample images) | train | val (every image
            and cached view of the split, for order extraction) | images_val | images_train | images_all (the
            images themselves, for editing).
        num_samples: number of images `predict` samples (labels cycle over the classes).
        sample_seed: seed of the first sampled image (image i uses sample_seed + i's batch).
        max_predict_images: images_* splits: only the first this many images (None: all).
    """

    def __init__(self, source: Dataset | None = None, batch_size: int = 64, val_fraction: float = 0.1,
                 split_seed: int = 0, num_workers: int = 0, flip: bool = False,
                 tokenizer_ckpt: str | None = None, cache_dir: str = "cache",
                 tokenize_batch_size: int = 256, max_val_images: int | None = None,
                 orders_path: str | None = None, predict_split: str = "samples", num_samples: int = 64,
                 sample_seed: int = 0, max_predict_images: int | None = None):
        super().__init__()
        if source is None:
            from datamodules.sources import SunsetSource

            source = SunsetSource()
        self.source = source
        self.batch_size, self.num_workers, self.flip = batch_size, num_workers, flip
        self.val_fraction, self.split_seed, self.max_val_images = val_fraction, split_seed, max_val_images
        self.tokenizer_ckpt, self.cache_dir, self.tokenize_batch_size = tokenizer_ckpt, cache_dir, tokenize_batch_size
        self.num_classes: int = source.num_classes
        self.image_size: int = source.image_size
        if self.image_size < 1:
            raise ValueError(f"{IMAGE_SIZE_KEY} = {self.image_size} is impossible: set it to a positive multiple of "
                             "the tokenizer's downsampling factor, e.g. 32")
        if num_samples < 1:
            raise ValueError(f"data.init_args.num_samples = {num_samples} is impossible: set it to the number of "
                             "images to sample (>= 1)")
        checks = [("batch_size", batch_size >= 1, "an integer >= 1"),
                  ("val_fraction", 0.0 <= val_fraction < 1.0, "a share in [0, 1)"),
                  ("num_workers", num_workers >= 0, ">= 0"), ("tokenize_batch_size", tokenize_batch_size >= 1, ">= 1"),
                  ("max_val_images", max_val_images is None or max_val_images >= 1, ">= 1, or null for all")]
        for key, ok, expected in checks:
            if not ok:
                raise ValueError(f"data.init_args.{key} = {locals()[key]} is impossible: set it to {expected}")
        self.vocab_size: int | None = None
        self.grid_size: tuple[int, int] | None = None
        if tokenizer_ckpt is not None:
            if not Path(tokenizer_ckpt).is_file():
                raise FileNotFoundError(
                    f"tokenizer checkpoint {tokenizer_ckpt!r} (data.init_args.tokenizer_ckpt) not found: "
                    f"{TOKENIZER_HINT}")
            self.vocab_size, self.grid_size = tokenizer_facts(tokenizer_ckpt, self.image_size)
        if predict_split not in PREDICT_SPLITS:
            raise ValueError(f"data.init_args.predict_split must be one of {', '.join(PREDICT_SPLITS)}, got "
                             f"{predict_split!r}")
        if max_predict_images is not None and max_predict_images < 1:
            raise ValueError(f"data.init_args.max_predict_images = {max_predict_images} is impossible: set it to >= 1, "
                             "or null for every image of the split")
        self.max_predict_images = max_predict_images
        for key, folder in (("orders_path", orders_path), ("cache_dir", cache_dir)):
            if folder is not None and Path(folder).is_file():
                raise ValueError(f"data.init_args.{key} = {folder} is a file, not a folder: give a folder (it is "
                                 "created if missing)")
        self.orders_path = orders_path
        self.predict_split, self.num_samples, self.sample_seed = predict_split, num_samples, sample_seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    @property
    def token_mode(self) -> bool:
        return self.tokenizer_ckpt is not None

    def split_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Deterministic (train, val) dataset indices."""
        n = len(self.source)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
        n_val = max(1, int(round(n * self.val_fraction))) if self.val_fraction > 0 else 0
        val = perm[:n_val].sort().values
        if self.max_val_images is not None:
            val = val[: self.max_val_images]
        return perm[n_val:].sort().values, val

    def _reads_tokens(self) -> bool:
        """Whether this run reads the token cache: not editing (it tokenizes its own images), and not `predict` of
        samples (sampling a converted ImageNet model must not tokenize ImageNet first)."""
        predicting = self.trainer is not None and self.trainer.state.fn == "predict"
        skip = self.predict_split.startswith(IMAGE_SPLITS) or (predicting and self.predict_split == "samples")
        return self.token_mode and not skip

    def prepare_data(self) -> None:
        if self._reads_tokens():
            # Lightning runs this on one process per node: the cache is built once
            ensure_token_cache(self.source, self.tokenizer_ckpt, self._manifest(), self.cache_dir,
                               self.tokenize_batch_size, self.num_workers)

    def _manifest(self) -> dict:
        if not hasattr(self, "_manifest_cache"):
            self._manifest_cache = manifest_for(self.source, self.tokenizer_ckpt, self.flip)
        return self._manifest_cache

    def token_manifest(self) -> dict:
        """What the token cache was made from (dataset fingerprint, tokenizer hash, grid, vocabulary)."""
        return self._manifest()

    def token_cache(self) -> dict:
        """The token cache (tokens (N,F,h,w), labels, manifest); built first if missing, read once."""
        if not hasattr(self, "_token_cache"):
            path = cache_path(self.cache_dir, self._manifest())
            try:
                self._token_cache = load_token_cache(path, self._manifest())
            except (FileNotFoundError, UnreadableFileError):  # missing or damaged: (re)build it
                ensure_token_cache(self.source, self.tokenizer_ckpt, self._manifest(), self.cache_dir,
                                   self.tokenize_batch_size, self.num_workers)
                self._token_cache = load_token_cache(path, self._manifest())
            rows = {len(self._token_cache["tokens"]), len(self._token_cache["labels"])}
            if rows != {len(self.source)}:
                raise ValueError(f"token cache {path} holds {sorted(rows)} rows for the {len(self.source)} images its "
                                 "manifest names: it is damaged; delete it and rerun (it is rebuilt)")
        return self._token_cache

    def labels_of(self, indices: torch.Tensor) -> torch.Tensor:
        return self.token_cache()["labels"][indices]

    def extraction_keys(self) -> list[tuple[int, int]]:
        """Every (image index, view) of `predict_split`: the views whose K orders the orders file holds."""
        indices = self.split_indices()[self.predict_split == "val"]
        views = self.token_cache()["tokens"].shape[1]
        return [(int(i), f) for i in indices for f in range(views)]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None or stage == "predict":  # predict builds its own dataset
            return
        train_idx, val_idx = self.split_indices()
        if self.token_mode:
            cache = self.token_cache()
            self.train_set = TokenSplit(cache["tokens"], cache["labels"], train_idx, self.flip, self._orders())
            self.val_set = TokenSplit(cache["tokens"], cache["labels"], val_idx, False)
        else:
            self.train_set = ImageSplit(self.source, train_idx, self.flip)
            self.val_set = ImageSplit(self.source, val_idx, False)

    def _orders(self) -> torch.Tensor | None:
        """Per-image training orders (N, F, K, n) when an orders file is given (distillation)."""
        if self.orders_path is None:
            return None
        return load_orders(self.orders_path, self.token_manifest(), indices=self.split_indices()[0])

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        workers = 0 if self.token_mode else self.num_workers
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, drop_last=shuffle,
                          num_workers=workers, persistent_workers=workers > 0,
                          worker_init_fn=leave_stop_signals_to_the_main_process if workers else None)

    def train_dataloader(self) -> DataLoader:
        self._check_one_batch()
        return self._loader(self.train_set, shuffle=True)

    def _check_one_batch(self) -> None:
        """Refuse a training split smaller than one batch (training would run no step and save nothing)."""
        world = self.trainer.world_size if self.trainer is not None else 1
        per_process = math.ceil(len(self.train_set) / world)
        if per_process >= self.batch_size:
            return
        where = f"image folder {self.source.root}" if hasattr(self.source, "root") else type(self.source).__name__
        each = f", {per_process} per process on {world} processes" if world > 1 else ""
        fix = f"set data.init_args.batch_size to {per_process} or less, or add images" if per_process else \
            "add images or lower data.init_args.val_fraction"
        raise ValueError(
            f"{where} has {len(self.source)} usable images ({len(self.train_set)} for training after "
            f"data.init_args.val_fraction = {self.val_fraction}{each}), fewer than one training batch "
            f"(data.init_args.batch_size = {self.batch_size}): {fix}")

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        if self.predict_split == "samples":
            dataset = SampleRequests(self.num_samples, self.num_classes, self.sample_seed)
        elif self.predict_split.startswith(IMAGE_SPLITS):
            dataset = ImageItems(self.source, self._image_indices())
        else:
            if not self.token_mode:
                raise ValueError("predict over a split needs data.init_args.tokenizer_ckpt (token mode)")
            dataset = self._extraction_set()
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False)

    def _image_indices(self) -> torch.Tensor:
        """Dataset indices of an images_* predict split, at most `max_predict_images`."""
        train, val = self.split_indices()
        split = self.predict_split.removeprefix(IMAGE_SPLITS)
        indices = {"train": train, "val": val, "all": torch.arange(len(self.source))}[split]
        return indices[: self.max_predict_images]

    def _extraction_set(self) -> TokenViews:
        """The views still to extract: views whose K orders are in finished shards are skipped (resumption)."""
        if self.orders_path is None:
            raise ValueError("order extraction needs data.init_args.orders_path (the folder to write)")
        done = finished_views(self.orders_path)
        keys = [k for k in self.extraction_keys() if k not in done]
        pad = [0] * len(keys)
        world = self.trainer.world_size if self.trainer is not None else 1
        if 0 < len(keys) < world:  # Lightning's predict sampler needs an item on every process
            pad += [1] * (world - len(keys))
            keys += [keys[0]] * (world - len(keys))
        if done:
            log.info("orders: %d of %d views already written, %d left", len(done), len(done) + len(keys), len(keys))
        cache = self.token_cache()
        return TokenViews(cache["tokens"], cache["labels"], keys, pad)

    def real_images(self, num: int, split: str = "val") -> torch.Tensor:
        """The first `num` images of a split as uint8 (num, 3, H, W), for FID and sample grids."""
        train_idx, val_idx = self.split_indices()
        indices = (val_idx if split == "val" else train_idx)[:num]
        return torch.stack([self.source[int(i)][0] for i in indices])
