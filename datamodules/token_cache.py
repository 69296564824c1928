"""Token cache: a dataset's token grids, made once from a tokenizer checkpoint and keyed by both.

The file name carries a key hashed from the dataset fingerprint, the tokenizer checkpoint's hash and
the flip setting, so a cache made from anything else is never picked up: a stale cache is rebuilt,
not reused. Files are written to a temp file and renamed, so an interrupted build leaves no cache.
"""

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

log = logging.getLogger("oar.data")

FORMAT_VERSION = 1


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Content hash of a file (checkpoints change whenever they are re-saved)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_save(obj, path: str | Path) -> None:
    """`torch.save` to a temp file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def cache_manifest(fingerprint: str, tokenizer_hash: str, flip: bool, grid: tuple[int, int],
                   vocab_size: int) -> dict:
    return {
        "format": FORMAT_VERSION,
        "dataset_fingerprint": fingerprint,
        "tokenizer_sha256": tokenizer_hash,
        "flip": flip,
        "grid_h": grid[0],
        "grid_w": grid[1],
        "vocab_size": vocab_size,
    }


def cache_path(cache_dir: str | Path, manifest: dict) -> Path:
    keyed = {k: manifest[k] for k in ("format", "dataset_fingerprint", "tokenizer_sha256", "flip")}
    key = hashlib.sha256(repr(sorted(keyed.items())).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"tokens-{key}.pt"


@torch.no_grad()
def tokenize_dataset(source: Dataset, tokenizer: nn.Module, flip: bool, batch_size: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode every image of `source` (and its mirror image when `flip`).

    Returns:
        tokens (N, F, h, w) int16/int32 (F = 2 with flips, index 1 = flipped) and labels (N,).
    """
    tokenizer = tokenizer.to(device).eval()
    loader = DataLoader(source, batch_size=batch_size, shuffle=False)
    tokens, labels = [], []
    for images, y in tqdm(loader, desc="tokenizing", unit="batch"):
        x = images.to(device).float().div(127.5).sub(1.0)
        views = [x, x.flip(-1)] if flip else [x]
        tokens.append(torch.stack([tokenizer.encode(v).cpu() for v in views], dim=1))
        labels.append(torch.as_tensor(y))
    dtype = torch.int16 if tokenizer.vocab_size <= 2**15 else torch.int32
    return torch.cat(tokens).to(dtype), torch.cat(labels).long()


def load_token_cache(path: Path, manifest: dict) -> dict:
    """Read a cache and check it was made from what `manifest` says; raises ValueError if not."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    if data.get("manifest") != manifest:
        raise ValueError(f"token cache {path} does not match its manifest; delete it and rerun")
    return data


def tokenizer_facts(tokenizer_ckpt: str | Path, image_size: int) -> tuple[int, tuple[int, int]]:
    """Vocabulary size and token grid of a tokenizer checkpoint, without loading its weights."""
    from models.checkpoint import build_net

    spec = torch.load(tokenizer_ckpt, map_location="cpu", weights_only=False)["net_spec"]
    with torch.device("meta"):
        net = build_net(spec)
    return net.vocab_size, tuple(net.grid_size(image_size))


def manifest_for(source: Dataset, tokenizer_ckpt: str | Path, flip: bool) -> dict:
    vocab_size, grid = tokenizer_facts(tokenizer_ckpt, source.image_size)
    return cache_manifest(source.fingerprint(), file_sha256(tokenizer_ckpt), flip, grid, vocab_size)


def ensure_token_cache(source: Dataset, tokenizer_ckpt: str | Path, manifest: dict,
                       cache_dir: str | Path, batch_size: int = 256) -> Path:
    """Make the cache for `manifest` unless a matching one exists; returns its path."""
    from models.checkpoint import load_net  # lazy: only the AR stages need a tokenizer

    path = cache_path(cache_dir, manifest)
    if path.exists():
        load_token_cache(path, manifest)
        log.info("token cache %s is up to date", path)
        return path
    log.info("building token cache %s from %s", path, tokenizer_ckpt)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokens, labels = tokenize_dataset(source, load_net(tokenizer_ckpt), manifest["flip"], batch_size, device)
    atomic_save({"tokens": tokens, "labels": labels, "manifest": manifest}, path)
    return path
