# Shapes: N images in the dataset, F views (2 with flips: index 1 = mirrored), K orders per view,
# n tokens = h*w, m rows of a shard.
"""The orders file between order extraction (stage 2) and distillation: a folder of shards.

Layout of `<orders_path>/`:
- `manifest.json`: what the orders were made from (dataset fingerprint, token-cache manifest and its
  hash, stage-1 checkpoint hash, extraction settings, split, N, F, K, grid), plus `statistics` once done.
- `shard-<tag>.pt`: `{"index": long (m,), "flip": long (m,), "k": long (m,), "order": int16 (m, n)}`,
  one per batch and process; `<tag>` is unique per process, run and batch, so processes never write the
  same file. A key is (index, flip, k): the k-th of the K orders of a view (K > 1 with noisy extraction:
  K different orders of one image); a batch writes all K orders of its views in one shard.
- `orders.pt` after completion: `{"orders": int16 (N, F, K, n), "done": bool (N, F, K), "manifest": dict}`
  with -1 rows for images outside the extracted split. Format 1 (before K existed) held `(N, F, n)` and
  `(N, F)`; `load_orders` still reads it, as K = 1.

Every file is written to a temp file in the folder and renamed, so a crash never leaves half a shard:
what `finished_keys` sees is finished, and a rerun extracts only the rest. A shard damaged later (a
truncated copy, a bad disk) is deleted with a warning, so the rerun extracts its keys again. Pure IO (torch, no
Lightning): the prediction writer `callbacks/order_writer.py` and the DataModule both use it.
"""

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from fileio import json_sha256, save_json, save_torch
from models.checkpoint import UnreadableFileError, read_checkpoint
from models.extraction import DEPRECATED

log = logging.getLogger("oar.extract")

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)  # format 1: one order per view, no K axis
MANIFEST = "manifest.json"
ORDERS = "orders.pt"
EXTRACT_CMD = "python run.py predict --config configs/extract_orders.yaml --ckpt_path <stage-1 checkpoint>"
# Keys added after the run started; they never make a manifest "different".
_ANNOTATIONS = ("statistics",)
# Rows checked at once for being permutations (bounds the memory of the sort on large datasets).
_CHUNK = 1 << 16


def orders_manifest(
    token_manifest: dict, model_sha256: str, settings: dict, split: str, num_images: int, orders_per_image: int = 1
) -> dict:
    """The manifest of an orders file.

    Args:
        token_manifest: manifest of the token cache the orders were extracted from
            (`datamodules.token_cache.cache_manifest`); gives the fingerprint, flips and grid.
        model_sha256: hash of the stage-1 checkpoint file.
        settings: extraction settings (score, positions per step, ...).
        split: the split extracted (train | val).
        num_images: N, the number of images of the whole dataset (rows of `orders.pt`).
        orders_per_image: K, the orders extracted per image view.
    """
    return _normalise(
        {
            "format": FORMAT_VERSION,
            "dataset_fingerprint": token_manifest["dataset_fingerprint"],
            "token_cache": token_manifest,
            "token_cache_sha": json_sha256(token_manifest),
            "model_sha256": model_sha256,
            "settings": settings,
            "split": split,
            "num_images": int(num_images),
            "views": 2 if token_manifest["flip"] else 1,
            "orders_per_image": int(orders_per_image),
            "grid": [int(token_manifest["grid_h"]), int(token_manifest["grid_w"])],
        }
    )


def _normalise(manifest: dict) -> dict:
    """The manifest as it reads back from JSON (tuples become lists), so comparisons are fair."""
    return json.loads(json.dumps(manifest, sort_keys=True))


def read_manifest(path: str | Path) -> dict:
    """The manifest of an orders folder (FileNotFoundError if there is none, ValueError if damaged)."""
    with open(Path(path) / MANIFEST) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"orders manifest {Path(path) / MANIFEST} is corrupt: delete the folder {path} and "
                             f"rerun `{EXTRACT_CMD}`") from err


def open_for_writing(path: str | Path, manifest: dict) -> Path:
    """Create the orders folder and its manifest, or check an existing one matches (to resume).

    Safe to call from every process at once: each writes the same manifest atomically.

    Raises:
        ValueError: the folder holds orders made from something else.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    manifest = _normalise(manifest)
    if not (path / MANIFEST).exists():
        save_json(manifest, path / MANIFEST, indent=1, sort_keys=True)
        return path
    existing = read_manifest(path)
    if isinstance(existing.get("settings"), dict):  # a manifest of an earlier release names the noise gumbel_*
        existing["settings"] = {DEPRECATED.get(k, k): v for k, v in existing["settings"].items()}
    differ = sorted(
        k
        for k in set(existing) | set(manifest)
        if k not in _ANNOTATIONS and existing.get(k) != manifest.get(k)
    )
    if differ:
        raise ValueError(
            f"orders folder {path} was started from a different {', '.join(differ)}: delete the "
            f"folder and rerun `{EXTRACT_CMD}`, or set data.init_args.orders_path to a new folder"
        )
    return path


def write_statistics(path: str | Path, statistics: dict) -> None:
    """Add `statistics` to the manifest (atomically)."""
    manifest = read_manifest(path)
    manifest["statistics"] = statistics
    save_json(_normalise(manifest), Path(path) / MANIFEST, indent=1, sort_keys=True)


def _shards(path: Path) -> list[Path]:
    # Temp files start with "." and end in ".tmp", so a half-written shard never matches.
    return sorted(path.glob("shard-*.pt"))


def _load(file: Path) -> dict:
    return read_checkpoint(file, "orders shard", f"rerun `{EXTRACT_CMD}`: it extracts that shard's orders again")


def _drop(file: Path) -> None:
    log.warning("orders shard %s is unreadable (truncated or corrupt): deleted, its orders are extracted again", file)
    file.unlink(missing_ok=True)  # every process may find it: the first one deletes it


def _rows(shard: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """index, flip, k (m,) and order (m, n) of a shard (k = 0 in shards written before K existed)."""
    index = shard["index"]
    return index, shard["flip"], shard.get("k", torch.zeros_like(index)), shard["order"]


def finished_keys(path: str | Path) -> set[tuple[int, int, int]]:
    """The (index, flip, k) keys whose orders are already written; empty when there is no folder.

    Unreadable shards are deleted (with a warning), so their keys count as not written.
    """
    keys: set[tuple[int, int, int]] = set()
    path = Path(path)
    if not path.is_dir():
        return keys
    for file in _shards(path):
        try:
            shard = _load(file)
        except FileNotFoundError:  # another process dropped it meanwhile
            continue
        except UnreadableFileError:
            _drop(file)
            continue
        keys.update(zip(*(t.tolist() for t in _rows(shard)[:3]), strict=True))
    return keys


def finished_views(path: str | Path) -> set[tuple[int, int]]:
    """The (index, flip) views whose K orders (K of the manifest) are all written: what a rerun skips."""
    keys = finished_keys(path)
    if not keys:
        return set()
    written: dict[tuple[int, int], set[int]] = {}
    for index, flip, k in keys:
        written.setdefault((index, flip), set()).add(k)
    every_k = set(range(read_manifest(path).get("orders_per_image", 1)))
    return {view for view, ks in written.items() if every_k <= ks}


def write_shard(path: str | Path, index: Tensor, flip: Tensor, order: Tensor, tag: str | None = None,
                k: Tensor | None = None) -> Path:
    """Write the orders of one batch as `shard-<tag>.pt` (atomically).

    Args:
        path: the orders folder (made by `open_for_writing`).
        index: (m,) dataset indices.
        flip: (m,) views (0 = as is, 1 = mirrored).
        order: (m, n) orders.
        tag: a name unique among all processes and runs (default: a random one).
        k: (m,) which of the K orders of its view each row is (default: 0, one order per view).
    """
    k = torch.zeros_like(torch.as_tensor(index)) if k is None else k
    index, flip, k, order = (torch.as_tensor(t).detach().cpu() for t in (index, flip, k, order))
    if order.dim() != 2 or not len(index) == len(flip) == len(k) == len(order):
        raise ValueError(
            f"expected index (m,), flip (m,), k (m,), order (m, n), got {tuple(index.shape)}, "
            f"{tuple(flip.shape)}, {tuple(k.shape)}, {tuple(order.shape)}"
        )
    if order.shape[1] > torch.iinfo(torch.int16).max + 1:
        raise ValueError(f"orders of {order.shape[1]} cells do not fit int16")
    tag = tag or os.urandom(8).hex()
    file = Path(path) / f"shard-{tag}.pt"
    save_torch({"index": index.long(), "flip": flip.long(), "k": k.long(), "order": order.to(torch.int16)}, file)
    return file


def _check_permutations(rows: Tensor, where: str) -> None:
    expected = torch.arange(rows.shape[-1])
    for start in range(0, len(rows), _CHUNK):
        chunk = rows[start : start + _CHUNK].long()
        bad = (chunk.sort(dim=1).values != expected).any(dim=1).nonzero()
        if len(bad):
            raise ValueError(
                f"{where}: row {start + int(bad[0])} is not a permutation of 0..{len(expected) - 1}"
            )


def _key_of(flat: int, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """(index, flip, k) of a flat key into (N, F, K)."""
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), shape))


def _gather(path: Path, shape: tuple[int, int, int], grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """orders int16 (N, F, K, n) and done bool (N, F, K) from every shard of the folder.

    Raises:
        ValueError: an unreadable shard (deleted), a row outside the manifest, not a permutation, or
            two different orders for one key.
    """
    num, views, per = shape
    n = grid[0] * grid[1]
    orders = torch.full((num * views * per, n), -1, dtype=torch.int16)
    done = torch.zeros(num * views * per, dtype=torch.bool)
    for file in _shards(path):
        try:
            shard = _load(file)
        except UnreadableFileError as err:
            _drop(file)
            raise ValueError(f"{err} (it is deleted now)") from err
        index, flip, k, order = _rows(shard)
        outside = (index < 0) | (index >= num) | (flip < 0) | (flip >= views) | (k < 0) | (k >= per)
        if outside.any() or order.shape[1] != n:
            raise ValueError(f"shard {file} does not fit the manifest ({num} images, {views} views, {per} orders "
                             f"per view, {grid[0]}x{grid[1]} grid)")
        _check_permutations(order, f"shard {file}")
        key = (index * views + flip) * per + k
        # Repeats inside the shard: sorted, equal neighbours must carry equal orders.
        sorted_key, perm = key.sort(stable=True)
        same = (sorted_key[1:] == sorted_key[:-1]).nonzero().flatten()
        clash = (order[perm[same]] != order[perm[same + 1]]).any(dim=1)
        # Repeats of keys written by earlier shards.
        seen = done[key].nonzero().flatten()
        clash_seen = (orders[key[seen]] != order[seen]).any(dim=1)
        if clash.any() or clash_seen.any():
            flat = int(sorted_key[same[clash]][0]) if clash.any() else int(key[seen[clash_seen]][0])
            raise ValueError(
                f"conflicting orders for (index, flip, k) = {_key_of(flat, shape)} in {path}: delete the "
                f"folder and rerun `{EXTRACT_CMD}`"
            )
        orders[key], done[key] = order, True
    return orders.view(*shape, n), done.view(shape)


def consolidate(path: str | Path, expected_views: Iterable[tuple[int, int]]) -> Path:
    """Gather all shards into `orders.pt` (atomically) and remove a killed run's temp files; returns its path.

    A key written twice with the same order is fine (a resumed or padded run may repeat items); two
    different orders for one key, a missing key or a key outside `expected_views` are errors.

    Args:
        path: the orders folder.
        expected_views: every (index, flip) of the extracted split; each needs its K orders (K of the manifest).

    Raises:
        ValueError: conflicting, missing or unexpected keys, or a row that is not a permutation.
    """
    path = Path(path)
    manifest = {k: v for k, v in read_manifest(path).items() if k not in _ANNOTATIONS}
    shape = (manifest["num_images"], manifest["views"], manifest.get("orders_per_image", 1))
    orders, done = _gather(path, shape, tuple(manifest["grid"]))
    expected = torch.zeros(shape, dtype=torch.bool)
    views = torch.tensor(list(expected_views), dtype=torch.long).view(-1, 2)
    expected[views[:, 0], views[:, 1]] = True
    for name, mask in (("missing", expected & ~done), ("unexpected", done & ~expected)):
        if mask.any():
            first = [tuple(key) for key in mask.nonzero()[:5].tolist()]
            raise ValueError(
                f"{int(mask.sum())} {name} (index, flip, k) keys in {path}, e.g. {first}: "
                f"rerun `{EXTRACT_CMD}`" + (" (it resumes)" if name == "missing" else "")
            )
    out = path / ORDERS
    save_torch({"orders": orders, "done": done, "manifest": manifest}, out)
    for stale in path.glob(".shard-*.tmp"):  # half shards of a killed run: every writer has finished by now
        stale.unlink(missing_ok=True)
    return out


def load_orders(path: str | Path, token_manifest: dict, indices: Tensor | None = None) -> Tensor:
    """The extracted orders for distillation, refused when missing, stale or incomplete.

    Args:
        path: the orders folder.
        token_manifest: manifest of the token cache in use now; the orders must come from the same.
        indices: dataset indices that will be trained on; every view of each must have its K orders.

    Returns:
        orders long (N, F, K, n), -1 rows for images outside the extracted split (K = 1 for format 1).

    Raises:
        FileNotFoundError: no folder, or extraction never finished (no `orders.pt`).
        ValueError: stale (another dataset, token cache or an unknown format), incomplete, or not permutations.
    """
    path = Path(path)
    if not (path / ORDERS).is_file():
        state = "is incomplete (extraction did not finish)" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"orders file {path} {state}: make it with `{EXTRACT_CMD}`")
    data = read_checkpoint(path / ORDERS, "orders file",
                           f"rerun `{EXTRACT_CMD}` with data.init_args.orders_path={path}: it rebuilds {ORDERS} from "
                           "the shards")
    manifest, orders, done = data["manifest"], data["orders"], data["done"]
    made_from = (manifest.get("dataset_fingerprint"), manifest.get("token_cache"))
    if manifest.get("format") not in READABLE_FORMATS or \
            made_from != (token_manifest["dataset_fingerprint"], _normalise(token_manifest)):
        raise ValueError(
            f"orders file {path} is stale (made from another dataset, tokenizer or format): delete "
            f"it and rerun `{EXTRACT_CMD}`"
        )
    if manifest["format"] == 1:  # one order per view, no K axis
        orders, done = orders.unsqueeze(2), done.unsqueeze(2)
    if indices is None:
        wanted = done.flatten(1).any(dim=1)  # at least: an image with an order has all of its orders
    else:
        wanted = done.new_zeros(done.shape[0])
        wanted[torch.as_tensor(indices).long()] = True
    if not wanted.any() or not done[wanted].all():
        raise ValueError(
            f"orders file {path} lacks orders for some training images (extracted split "
            f"{manifest['split']!r}): rerun `{EXTRACT_CMD}` with data.init_args.predict_split=train"
        )
    _check_permutations(orders[done], f"orders file {path}")
    return orders.long()
