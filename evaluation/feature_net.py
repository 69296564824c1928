# Shapes: b batch, c channels, H/W image size, d feature width, k outputs of one head.
"""A small multi-task CNN whose penultimate layer is a domain feature space for FID, KID and diversity.

Inception (FID's standard network) needs ~95 MB of ImageNet weights and sees 32 px images upsampled
to 299 px; offline, or on toy domains such as the synthetic sunsets, a small network trained on real
images of the domain is the usable alternative. Numbers measured with it compare models within one
table only: they are not comparable with published FIDs, nor across feature networks.

The network has one head per thing it learns: a classifier (k >= 2 outputs, cross-entropy) or a
regression (k = 1, mean squared error on the standardised target). On the synthetic sunsets it learns
the scene factors (sun hue, position and radius, number and tint of clouds, ground height), so its
features see structure, not only the class; on other data it learns the class (`class_heads`).

Input convention (the one torchmetrics' FID/KID use with `normalize=False`): uint8 images
(b, 3, H, W) in [0, 255]. `forward` returns the features, so the module can be handed to
`FrechetInceptionDistance(feature=...)` as is; `outputs` and `predict` give the heads.
"""

import logging
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.checkpoint import record_init

log = logging.getLogger("oar.evaluation")


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3x3 convs with BatchNorm and ReLU, then a 2x2 max-pool (halves H and W)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


def class_heads(num_classes: int) -> dict[str, int]:
    """The one head of a plain classifier (unconditional data: one class, which teaches nothing)."""
    return {"class": max(num_classes, 2)}


class SmallConvNetFeatures(nn.Module):
    """Three conv blocks, a 4x4 average pool (where things are stays visible), a d-wide feature layer, heads.

    Args:
        heads: name -> outputs: >= 2 for a classifier, 1 for a regressed number.
        in_channels: image channels.
        width: channels of the first block (doubled in each of the next two).
        feature_dim: d, the width of the penultimate layer (the features).
    """

    def __init__(self, heads: dict[str, int], in_channels: int = 3, width: int = 32, feature_dim: int = 128):
        super().__init__()
        record_init(self, locals())
        if not heads or min(heads.values()) < 1:
            raise ValueError(f"heads must map names to >= 1 outputs, got {heads}")
        self.num_features = feature_dim  # read by torchmetrics instead of probing with a dummy image
        self.body = nn.Sequential(
            _conv_block(in_channels, width), _conv_block(width, 2 * width), _conv_block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),  # (b, 4w, 4, 4) -> (b, 64w)
            nn.Linear(64 * width, feature_dim), nn.ReLU(inplace=True),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, k) for name, k in heads.items()})
        # Mean and std of each regression target (set by `train_feature_net`): heads predict standardised values.
        self.register_buffer("target_stats", torch.tensor([[0.0, 1.0]]).repeat(len(heads), 1))

    @staticmethod
    def to_input(images: Tensor) -> Tensor:
        """uint8 (b,3,H,W) in [0, 255] -> float in [-1, 1], on the network's side of the boundary."""
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images in [0, 255], got {images.dtype}")
        return images.float().div(127.5).sub(1.0)

    def forward(self, images: Tensor) -> Tensor:
        """Features (b, d) of uint8 images (b, 3, H, W)."""
        return self.body(self.to_input(images))

    def outputs(self, images: Tensor) -> dict[str, Tensor]:
        """Raw head outputs: class logits (b, k), or standardised regressions (b, 1)."""
        feats = self.forward(images)
        return {name: head(feats) for name, head in self.heads.items()}

    def is_class(self, name: str) -> bool:
        return self.heads[name].out_features > 1

    def predict(self, images: Tensor) -> dict[str, Tensor]:
        """Per head (b,): the arg-max class, or the regressed value in the target's own units."""
        out = {}
        for j, (name, y) in enumerate(self.outputs(images).items()):
            mean, std = self.target_stats[j]
            out[name] = y.argmax(1) if self.is_class(name) else y[:, 0] * std + mean
        return out

    def loss(self, images: Tensor, targets: dict[str, Tensor]) -> Tensor:
        """Sum over heads of cross-entropy (classes) and MSE on standardised targets (regressions)."""
        total = images.new_zeros((), dtype=torch.float32)
        for j, (name, y) in enumerate(self.outputs(images).items()):
            target = targets[name].to(y.device)
            if self.is_class(name):
                total = total + F.cross_entropy(y, target.long())
            else:
                mean, std = self.target_stats[j]
                total = total + F.mse_loss(y[:, 0], (target.float() - mean) / std)
        return total

    def fit_target_stats(self, targets: dict[str, Tensor]) -> None:
        """Standardise each regression head by its training targets' mean and std."""
        for j, name in enumerate(self.heads):
            if not self.is_class(name):
                t = targets[name].double()
                self.target_stats[j] = torch.stack([t.mean(), t.std().clamp_min(1e-6)]).float()


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    return list(torch.randperm(n, generator=generator).split(batch_size))


def train_feature_net(
    net: SmallConvNetFeatures, images: Tensor, targets: dict[str, Tensor], max_epochs: int = 5,
    max_seconds: float = 600.0, batch_size: int = 128, lr: float = 2e-3, seed: int = 0, flip: bool = True,
    log_every_s: float = 15.0,
) -> dict:
    """Train every head of `net` (AdamW, cosine decay over `max_epochs`, optional random flips).

    The budget is `max_epochs`, so the network (and every metric measured with it) does not depend on
    the machine's speed; `max_seconds` is only a safety cap (`capped` in the result says it was hit).

    Args:
        net: the network, trained in place and left in eval mode.
        images: uint8 (N, 3, H, W) training images.
        targets: head name -> (N,) targets (class indices or numbers).
        max_epochs: the budget; also the length of the cosine schedule.
        max_seconds: wall-clock safety cap (checked between batches).
        batch_size: images per step.
        lr: peak learning rate.
        seed: seed of the shuffling and the flips.
        flip: mirror half the images; only for targets a mirror leaves unchanged (classes, not positions).
        log_every_s: log a progress line at most this often.

    Returns:
        {"epochs": float, "steps": int, "seconds": float, "train_loss": float, "capped": bool}.
    """
    generator = torch.Generator().manual_seed(seed)
    net.fit_target_stats(targets)
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
            if flip:
                mirror = (torch.rand(len(x), generator=generator) < 0.5).to(x.device)
                x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
            loss = net.loss(x, {name: t[index] for name, t in targets.items()})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            now = time.perf_counter()
            if now - last_log > log_every_s:
                log.info("feature net: step %d/%d  loss %.3f  %.0f s", step, total, loss.item(), now - start)
                last_log = now
            if step >= total or now - start > max_seconds:
                break
    net.eval()
    return {"epochs": step / steps_per_epoch, "steps": step, "seconds": time.perf_counter() - start,
            "train_loss": loss.item(), "capped": step < total}


@torch.no_grad()
def predictions(net: SmallConvNetFeatures, images: Tensor, batch_size: int = 512) -> dict[str, Tensor]:
    """`net.predict` over many uint8 images, batched, on the network's device; CPU tensors (N,)."""
    device = next(net.parameters()).device
    parts = [net.predict(x.to(device)) for x in images.split(batch_size)]
    return {name: torch.cat([p[name] for p in parts]).cpu() for name in net.heads}


def head_scores(net: SmallConvNetFeatures, images: Tensor, targets: dict[str, Tensor]) -> dict[str, dict]:
    """Per head: {"accuracy"} for a classifier; {"r2", "mae"} (target units) for a regression."""
    scores = {}
    for name, pred in predictions(net, images).items():
        target = targets[name].cpu()
        if net.is_class(name):
            scores[name] = {"accuracy": float((pred == target.long()).float().mean())}
        else:
            err = pred.double() - target.double()
            r2 = 1 - float(err.pow(2).mean() / target.double().var(unbiased=False).clamp_min(1e-12))
            scores[name] = {"r2": r2, "mae": float(err.abs().mean())}
    return scores


def label_accuracy(net: SmallConvNetFeatures, head: str, images: Tensor, labels: Tensor) -> float:
    """Share of `images` whose class under `head` is their label (class accuracy of conditional samples)."""
    return float((predictions(net, images)[head] == labels.cpu().long()).float().mean())


@torch.no_grad()
def features(net: nn.Module, images: Tensor, batch_size: int = 512) -> Tensor:
    """Features (N, d) of uint8 images (N, 3, H, W), batched."""
    return torch.cat([net(x) for x in images.split(batch_size)])


def targets_for(source, indices: Tensor, labels: Tensor) -> tuple[dict[str, int], dict[str, Tensor], str | None]:
    """What the feature network learns on `source`: its heads, the targets of items `indices`, the label's head.

    A source with `scene_heads` and `scene_targets(index)` (the synthetic sunsets) gives its scene
    factors and names the factor its label is (`label_head`, None when unconditional); any other
    source gives its class.

    Returns:
        (heads, {head: (N,) targets}, head whose class is the label or None).
    """
    if hasattr(source, "scene_heads"):
        rows = [source.scene_targets(int(i)) for i in indices]
        targets = {name: torch.tensor([row[name] for row in rows]) for name in source.scene_heads}
        return dict(source.scene_heads), targets, source.label_head
    conditional = source.num_classes > 0
    return class_heads(source.num_classes), {"class": labels.long()}, "class" if conditional else None
