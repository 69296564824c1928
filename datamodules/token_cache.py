"""Token cache: a dataset's token grids, made once from a tokenizer checkpoint and keyed by both.

The file name carries a key hashed from the dataset fingerprint, the tokenizer checkpoint's hash and
the flip setting, so a cache made from anything else is never picked up: a stale cache is rebuilt,
not reused. Files are written to a temp file and renamed, so an interrupted build leaves no cache; a
cache damaged later (truncated copy, bad disk) is rebuilt with a warning.

The cache is memory-mapped, never a tensor in RAM (ImageNet: 1.28M images x 2 views x 256 tokens, 1.3 GB of
int16): the tokens are written batch by batch into a file-backed scratch tensor next to the cache, saved with
`torch.save` (one zip file, the format of every cache so far, so older caches read as they are), and read back
with `torch.load(mmap=True)`, so the processes of a DDP run share the pages the OS caches instead of holding a
copy each.
"""

import hashlib
import logging
import math
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from fileio import file_sha256, save_torch
from models.checkpoint import UnreadableFileError, build_net, check_net_spec, load_net, read_checkpoint

log = logging.getLogger("oar.data")

FORMAT_VERSION = 1
TOKENIZER_WHAT = "tokenizer checkpoint (data.init_args.tokenizer_ckpt)"
TOKENIZER_FIX = ("make it with `python run.py fit --config configs/tokenizer.yaml` or point "
                 "data.init_args.tokenizer_ckpt at another tokenizer checkpoint")
IMAGE_SIZE_KEY = "data.init_args.source.init_args.image_size"


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


def token_dtype(vocab_size: int) -> torch.dtype:
    return torch.int16 if vocab_size <= 2**15 else torch.int32


@torch.no_grad()
def tokenize_dataset(source: Dataset, tokenizer: nn.Module, flip: bool, batch_size: int,
                     device: torch.device, out: torch.Tensor | None = None, num_workers: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode every image of `source` (and its mirror image when `flip`), batch by batch into `out`.

    Args:
        out: (N, F, h, w) the tokens are written into (e.g. a file-backed tensor); None: a new tensor.
        num_workers: DataLoader workers decoding the images.

    Returns:
        tokens (N, F, h, w) int16/int32 (F = 2 with flips, index 1 = flipped) and labels (N,).
    """
    tokenizer = tokenizer.to(device).eval()
    loader = DataLoader(source, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    labels, start = [], 0
    for images, y in tqdm(loader, desc="tokenizing", unit="batch"):
        x = images.to(device).float().div(127.5).sub(1.0)
        views = [x, x.flip(-1)] if flip else [x]
        batch = torch.stack([tokenizer.encode(v).cpu() for v in views], dim=1)
        if out is None:
            out = torch.empty((len(source), *batch.shape[1:]), dtype=token_dtype(tokenizer.vocab_size))
        out[start : start + len(batch)] = batch.to(out.dtype)
        start += len(batch)
        labels.append(torch.as_tensor(y))
    return out, torch.cat(labels).long()


def load_token_cache(path: Path, manifest: dict) -> dict:
    """Read a cache and check it was made from what `manifest` says.

    Raises:
        UnreadableFileError: the file is damaged (`ensure_token_cache` rebuilds it).
        ValueError: it was made from something else.
    """
    data = read_checkpoint(path, "token cache", "delete it and rerun: it is rebuilt", mmap=True)
    if data.get("manifest") != manifest:
        raise ValueError(f"token cache {path} does not match its manifest; delete it and rerun")
    return data


def check_image_size(image_size: int, downsample: int, tokenizer: str) -> None:
    """Refuse an image size the tokenizer cannot cut into whole tokens (ValueError naming the key)."""
    if image_size < 1 or image_size % downsample:
        nearest = max(downsample, round(image_size / downsample) * downsample)
        raise ValueError(f"{IMAGE_SIZE_KEY} = {image_size} is not a positive multiple of the downsampling factor "
                         f"{downsample} of {tokenizer}: set it to a multiple of {downsample}, e.g. {nearest}")


def tokenizer_facts(tokenizer_ckpt: str | Path, image_size: int) -> tuple[int, tuple[int, int]]:
    """Vocabulary size and token grid of a tokenizer checkpoint, without building its weights."""
    ckpt = read_checkpoint(tokenizer_ckpt, TOKENIZER_WHAT, TOKENIZER_FIX, mmap=True)
    if "net_spec" not in ckpt:
        raise ValueError(f"{TOKENIZER_WHAT} {tokenizer_ckpt} has no 'net_spec': it was not written by this "
                         f"project's LightningModules: {TOKENIZER_FIX}")
    with torch.device("meta"):
        net = build_net(check_net_spec(ckpt["net_spec"], tokenizer_ckpt, TOKENIZER_WHAT))
    if not all(hasattr(net, fact) for fact in ("vocab_size", "downsample", "grid_size", "encode")):
        raise ValueError(f"{TOKENIZER_WHAT} {tokenizer_ckpt} holds a network of class {type(net).__name__}, "
                         f"not a tokenizer: {TOKENIZER_FIX}")
    check_image_size(image_size, net.downsample, f"tokenizer {tokenizer_ckpt}")
    return net.vocab_size, tuple(net.grid_size(image_size))


def manifest_for(source: Dataset, tokenizer_ckpt: str | Path, flip: bool) -> dict:
    vocab_size, grid = tokenizer_facts(tokenizer_ckpt, source.image_size)
    return cache_manifest(source.fingerprint(), file_sha256(tokenizer_ckpt), flip, grid, vocab_size)


def ensure_token_cache(source: Dataset, tokenizer_ckpt: str | Path, manifest: dict,
                       cache_dir: str | Path, batch_size: int = 256, num_workers: int = 0) -> Path:
    """Make the cache for `manifest` unless a matching one exists (a damaged one is rebuilt); returns its path."""
    path = cache_path(cache_dir, manifest)
    if path.exists():
        try:
            load_token_cache(path, manifest)
            log.info("token cache %s is up to date", path)
            return path
        except UnreadableFileError:
            log.warning("token cache %s is unreadable (truncated or corrupt): rebuilding it", path)
    log.info("building token cache %s from %s", path, tokenizer_ckpt)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_net(tokenizer_ckpt, what=TOKENIZER_WHAT, fix=TOKENIZER_FIX)
    shape = (len(source), 2 if manifest["flip"] else 1, manifest["grid_h"], manifest["grid_w"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".tokens-") as scratch:  # removed even when interrupted
        # file-backed: the tokens never sit in RAM, however many images (torch.save streams them out)
        out = torch.from_file(str(Path(scratch) / "tokens.raw"), shared=True, size=math.prod(shape),
                              dtype=token_dtype(manifest["vocab_size"])).view(shape)
        tokens, labels = tokenize_dataset(source, tokenizer, manifest["flip"], batch_size, device, out, num_workers)
        save_torch({"tokens": tokens, "labels": labels, "manifest": manifest}, path)
        del out, tokens  # unmap before the scratch folder goes
    return path
