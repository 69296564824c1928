# Shapes: N images, n tokens = h*w, H/W image size.
"""The real images and token sequences a comparison measures against, none of which any network trained on.

The validation split is cut into two disjoint halves A and B: samples are compared with B; A against B
is the metric's floor at that sample size (the reference row) and A through the tokenizer against B is
the ceiling no AR model over its tokens can beat. NLL is measured on held-out token sequences.

What it needs of the data (`datamodules.datamodule.OARDataModule`, duck-typed): `source` (items
(uint8 image (3,H,W), label)), `split_indices() -> (train, val)` and, for tokens, `token_cache()`.
"""

import torch
from torch import Tensor


def images_of(source, indices: Tensor) -> tuple[Tensor, Tensor]:
    """uint8 images (N,3,H,W) and labels (N,) of items `indices` of a source."""
    items = [source[int(i)] for i in indices]
    return torch.stack([image for image, _ in items]), torch.tensor([label for _, label in items])


def held_out_halves(dm, m: int) -> tuple[Tensor, Tensor]:
    """Validation indices of two disjoint real sets A and B of `m` images each.

    Raises:
        ValueError: the validation split holds fewer than 2m images.
    """
    val_idx = dm.split_indices()[1]
    if len(val_idx) < 2 * m:
        raise ValueError(f"the validation split holds {len(val_idx)} images, the evaluation needs 2 x {m} (two "
                         "held-out halves): raise budget.val_images in the experiment file, or lower budget.samples")
    return val_idx[:m], val_idx[m:2 * m]


def val_tokens(dm, limit: int) -> tuple[Tensor, Tensor]:
    """The first `limit` held-out token sequences (N, n) (unflipped view) and labels (N,) from the token cache."""
    cache = dm.token_cache()
    indices = dm.split_indices()[1][:limit]
    return cache["tokens"][indices, 0].flatten(1).long(), cache["labels"][indices].long()


@torch.no_grad()
def reconstruct(tokenizer, images: Tensor, batch_size: int = 256) -> Tensor:
    """uint8 images (N,3,H,W) passed through the tokenizer (encode, decode), on its device; CPU uint8 out."""
    device = next(tokenizer.parameters()).device
    out = []
    for x in images.split(batch_size):
        y = tokenizer.decode_indices(tokenizer.encode(x.to(device).float().div(127.5).sub(1.0)))
        out.append(y.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).cpu())
    return torch.cat(out)
