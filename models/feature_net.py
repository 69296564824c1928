# Shapes: b batch, c channels, H/W image size, d feature width, C classes.
"""A small CNN classifier whose penultimate layer is a domain feature space for FID, KID and diversity.

Inception (FID's standard network) needs ~95 MB of ImageNet weights and sees 32 px images upsampled
to 299 px; offline, or on toy domains such as the synthetic sunsets, a classifier trained on the real
training images with their labels is the usable alternative. Numbers measured with it compare models
within one table only: they are not comparable with published FIDs, nor across feature networks.

Input convention (the one torchmetrics' FID/KID use with `normalize=False`): uint8 images
(b, 3, H, W) in [0, 255]. `forward` returns the features, so the module can be handed to
`FrechetInceptionDistance(feature=...)` as is; `logits` gives the class scores it was trained on.
"""

import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.checkpoint import record_init


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3x3 convs with BatchNorm and ReLU, then a 2x2 max-pool (halves H and W)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class SmallConvNetFeatures(nn.Module):
    """Three conv blocks, global average pooling, a d-wide penultimate layer, a linear class head.

    Args:
        num_classes: classes of the head (>= 1; unconditional data trains nothing useful).
        in_channels: image channels.
        width: channels of the first block (doubled in each of the next two).
        feature_dim: d, the width of the penultimate layer (the features).
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32, feature_dim: int = 128):
        super().__init__()
        record_init(self, locals())
        self.num_features = feature_dim  # read by torchmetrics instead of probing with a dummy image
        self.body = nn.Sequential(
            _conv_block(in_channels, width), _conv_block(width, 2 * width), _conv_block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4 * width, feature_dim), nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(feature_dim, max(num_classes, 1))

    @staticmethod
    def to_input(images: Tensor) -> Tensor:
        """uint8 (b,3,H,W) in [0, 255] -> float in [-1, 1], on the network's side of the boundary."""
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images in [0, 255], got {images.dtype}")
        return images.float().div(127.5).sub(1.0)

    def forward(self, images: Tensor) -> Tensor:
        """Features (b, d) of uint8 images (b, 3, H, W)."""
        return self.body(self.to_input(images))

    def logits(self, images: Tensor) -> Tensor:
        """Class logits (b, C)."""
        return self.head(self.forward(images))


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    return list(torch.randperm(n, generator=generator).split(batch_size))


def train_classifier(
    net: SmallConvNetFeatures, images: Tensor, labels: Tensor, max_epochs: int = 5, max_seconds: float = 600.0,
    batch_size: int = 128, lr: float = 2e-3, seed: int = 0, log_every_s: float = 15.0,
) -> dict:
    """Train `net` as a classifier (cross-entropy, AdamW, cosine decay over `max_epochs`, random flips).

    The budget is `max_epochs`, so the network (and every metric measured with it) does not depend on
    the machine's speed; `max_seconds` is only a safety cap (`capped` in the result says it was hit).

    Args:
        net: the network, trained in place and left in eval mode.
        images: uint8 (N, 3, H, W) training images.
        labels: long (N,) their classes.
        max_epochs: the budget; also the length of the cosine schedule.
        max_seconds: wall-clock safety cap (checked between batches).
        batch_size: images per step.
        lr: peak learning rate.
        seed: seed of the shuffling and the flips.
        log_every_s: print a progress line at most this often.

    Returns:
        {"epochs": float, "steps": int, "seconds": float, "train_loss": float, "capped": bool}.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    total = max_epochs * steps_per_epoch
    cosine = lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
    net.train()
    start = last_log = time.perf_counter()
    step, loss = 0, torch.tensor(float("nan"))
    while step < total and time.perf_counter() - start < max_seconds:
        for index in _batches(len(images), batch_size, generator):
            x = images[index]
            flip = (torch.rand(len(x), generator=generator) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(net.logits(x), labels[index].to(x.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            now = time.perf_counter()
            if now - last_log > log_every_s:
                print(f"  feature net: step {step}/{total}  loss {loss.item():.3f}  {now - start:.0f} s", flush=True)
                last_log = now
            if now - start > max_seconds:
                break
    net.eval()
    return {"epochs": step / steps_per_epoch, "steps": step, "seconds": time.perf_counter() - start,
            "train_loss": loss.item(), "capped": step < total}


@torch.no_grad()
def accuracy(net: SmallConvNetFeatures, images: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    """Share of `images` (uint8) whose arg-max class is the label (net in eval mode)."""
    correct = sum(int((net.logits(x).argmax(1) == y).sum())
                  for x, y in zip(images.split(batch_size), labels.split(batch_size), strict=True))
    return correct / max(len(images), 1)


@torch.no_grad()
def features(net: nn.Module, images: Tensor, batch_size: int = 512) -> Tensor:
    """Features (N, d) of uint8 images (N, 3, H, W), batched."""
    return torch.cat([net(x) for x in images.split(batch_size)])
