"""Vector quantizer with a straight-through estimator and dead-code restart.

Shapes: b batch, d code dim, h/w token grid, v codebook size, n = b*h*w flattened vectors.

Two codebooks, one small class each:
- `L2Codebook` (ViT-VQGAN, Yu et al. 2022): codes and inputs are l2-normalised, so the lookup is a
  cosine match; codes learn by gradient through the codebook loss.
- `EMACodebook` (VQ-VAE, van den Oord et al. 2017, appendix): codes are exponential moving averages
  of the encoder outputs assigned to them; no codebook gradient.

Modified from: https://github.com/lucidrains/vector-quantize-pytorch (l2 lookup, EMA update and
dead-code expiry as ideas; the code here is written from scratch).
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from models.checkpoint import record_init


class QuantizerOutput(NamedTuple):
    """What `VectorQuantizer.forward` returns.

    Attributes:
        quantized: (b,d,h,w) codes with the straight-through gradient to the encoder output.
        indices: long (b,h,w) chosen codes.
        commit_loss: beta * ||z - sg[q]||^2, already scaled by beta.
        codebook_loss: ||sg[z] - q||^2 for the l2 codebook; 0 for the EMA codebook.
        perplexity: exp(entropy) of the batch's code histogram (v means every code equally used).
        usage: long (v,) how often each code was chosen in this batch (this rank only).
    """

    quantized: Tensor
    indices: Tensor
    commit_loss: Tensor
    codebook_loss: Tensor
    perplexity: Tensor
    usage: Tensor


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce_sum(x: Tensor) -> Tensor:
    # EMA statistics must be identical on every rank, else the replicas' codebooks drift apart.
    if _dist_ready():
        torch.distributed.all_reduce(x)
    return x


class L2Codebook(nn.Module):
    """Codes on the unit sphere, learned by gradient; inputs are normalised the same way."""

    def __init__(self, codebook_size: int, code_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(codebook_size, code_dim))

    def codes(self) -> Tensor:
        """The codebook as used for lookup, (v,d)."""
        return F.normalize(self.weight, dim=-1)

    def prepare(self, z: Tensor) -> Tensor:
        """Map encoder vectors (n,d) into the space the codes live in."""
        return F.normalize(z, dim=-1)

    def codebook_loss(self, z: Tensor, q: Tensor) -> Tensor:
        return F.mse_loss(q, z.detach())

    def update(self, z: Tensor, indices: Tensor) -> None:
        """Gradient-trained codes need no update here."""

    @torch.no_grad()
    def replace(self, mask: Tensor, new: Tensor) -> None:
        """Overwrite the codes selected by `mask` (v,) with `new` (mask.sum(), d)."""
        self.weight[mask] = new


class EMACodebook(nn.Module):
    """Codes that track the mean of their assigned encoder outputs by EMA (no gradient)."""

    def __init__(self, codebook_size: int, code_dim: int, decay: float, eps: float = 1e-5) -> None:
        super().__init__()
        self.decay, self.eps = decay, eps
        weight = torch.randn(codebook_size, code_dim)
        self.register_buffer("weight", weight)
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("embed_sum", weight.clone())

    def codes(self) -> Tensor:
        return self.weight

    def prepare(self, z: Tensor) -> Tensor:
        return z

    def codebook_loss(self, z: Tensor, q: Tensor) -> Tensor:
        return z.new_zeros(())

    @torch.no_grad()
    def update(self, z: Tensor, indices: Tensor) -> None:
        """EMA step on the cluster sizes and sums, summed over all DDP ranks first."""
        v, d = self.weight.shape
        counts = torch.bincount(indices, minlength=v).to(z.dtype)
        sums = torch.zeros(v, d, device=z.device, dtype=z.dtype).index_add_(0, indices, z)
        counts, sums = _all_reduce_sum(counts), _all_reduce_sum(sums)
        self.cluster_size.lerp_(counts, 1 - self.decay)
        self.embed_sum.lerp_(sums, 1 - self.decay)
        # Laplace smoothing keeps empty clusters from dividing by zero (Oord et al. 2017).
        total = self.cluster_size.sum()
        size = (self.cluster_size + self.eps) / (total + v * self.eps) * total
        self.weight.copy_(self.embed_sum / size.unsqueeze(1))

    @torch.no_grad()
    def replace(self, mask: Tensor, new: Tensor) -> None:
        # A restarted code behaves as if it had been assigned exactly its new vector once.
        self.weight[mask] = new
        self.embed_sum[mask] = new
        self.cluster_size[mask] = 1.0


class VectorQuantizer(nn.Module):
    """Nearest-code quantizer with straight-through gradients and dead-code restart.

    Args:
        codebook_size: number of codes v.
        code_dim: code dimension d (channels of the encoder output).
        kind: "l2" (cosine lookup, codes learned by gradient) or "ema" (EMA codebook).
        beta: weight of the commitment loss (folded into `commit_loss`).
        ema_decay: decay of the EMA codebook and of the usage statistics.
        restart_dead_codes: in training, re-initialise rarely used codes from the current batch.
        dead_threshold: a code is dead when the EMA of its per-step usage count falls below this
            fraction of the mean count per code (batch vectors over all ranks / v).
    """

    def __init__(
        self,
        codebook_size: int,
        code_dim: int,
        kind: str = "l2",
        beta: float = 0.25,
        ema_decay: float = 0.99,
        restart_dead_codes: bool = True,
        dead_threshold: float = 0.03,
    ) -> None:
        super().__init__()
        record_init(self, locals())
        if kind == "l2":
            self.codebook = L2Codebook(codebook_size, code_dim)
        elif kind == "ema":
            self.codebook = EMACodebook(codebook_size, code_dim, ema_decay)
        else:
            raise ValueError(f"unknown quantizer kind {kind!r}; use 'l2' or 'ema'")
        self.codebook_size, self.code_dim, self.beta = codebook_size, code_dim, beta
        self.ema_decay = ema_decay
        self.restart_dead_codes, self.dead_threshold = restart_dead_codes, dead_threshold
        # Starts at zero, so the first training step seeds every code from the batch's encoder outputs:
        # a data-dependent initialisation for free.
        self.register_buffer("usage_ema", torch.zeros(codebook_size))

    def _nearest(self, z: Tensor) -> Tensor:
        """Indices (n,) of the nearest codes to prepared vectors z (n,d)."""
        codes = self.codebook.codes()
        # ||z - c||^2 up to the per-row constant ||z||^2, which does not change the argmin.
        dist = codes.pow(2).sum(1) - 2 * z @ codes.t()
        return dist.argmin(dim=1)

    def nearest(self, z: Tensor) -> Tensor:
        """Indices (b,h,w) of the codes nearest to encoder outputs z (b,d,h,w); updates nothing."""
        b, _, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = self.codebook.prepare(rearrange(z.float(), "b d h w -> (b h w) d"))
            return self._nearest(flat).view(b, h, w)

    def lookup(self, indices: Tensor) -> Tensor:
        """Codes (b,d,h,w) for indices (b,h,w)."""
        return rearrange(self.codebook.codes()[indices], "b h w d -> b d h w")

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize encoder outputs z (b,d,h,w); in training also update codes and restart dead ones."""
        b, _, h, w = z.shape
        # Distances in low precision pick wrong codes, so the quantizer always runs in float32.
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = self.codebook.prepare(rearrange(z.float(), "b d h w -> (b h w) d"))
            if self.training and self.restart_dead_codes:
                # Before the lookup: editing the codes after it would invalidate the autograd graph.
                self._restart_dead(flat.detach())
            indices = self._nearest(flat)
            q = self.codebook.codes()[indices]
            commit_loss = self.beta * F.mse_loss(flat, q.detach())
            codebook_loss = self.codebook.codebook_loss(flat, q)
            usage = torch.bincount(indices, minlength=self.codebook_size)
            probs = usage.float() / indices.numel()
            perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
            # Straight-through estimator: forward uses q, backward copies the gradient to flat.
            q = flat + (q - flat).detach()
            if self.training:
                self.codebook.update(flat.detach(), indices)
                self.usage_ema.lerp_(_all_reduce_sum(usage.float()), 1 - self.ema_decay)
        quantized = rearrange(q, "(b h w) d -> b d h w", b=b, h=h, w=w).to(z.dtype)
        return QuantizerOutput(quantized, indices.view(b, h, w), commit_loss, codebook_loss, perplexity, usage)

    @torch.no_grad()
    def _restart_dead(self, flat: Tensor) -> None:
        """Re-seed codes whose usage EMA (up to the last step) is below the threshold from batch vectors."""
        world = torch.distributed.get_world_size() if _dist_ready() else 1
        # Relative to the mean use, so one default suits any batch size and codebook size.
        threshold = self.dead_threshold * flat.shape[0] * world / self.codebook_size
        dead = self.usage_ema < threshold
        num_dead = int(dead.sum())
        if num_dead == 0:
            return
        n = flat.shape[0]
        # Distinct vectors where the batch allows, so two restarted codes do not start as twins.
        if n >= num_dead:
            pick = torch.randperm(n, device=flat.device)[:num_dead]
        else:
            pick = torch.randint(0, n, (num_dead,), device=flat.device)
        new = flat[pick]
        if _dist_ready():
            # Every rank sees a different batch; rank 0's choice keeps the replicas identical.
            torch.distributed.broadcast(new, src=0)
        self.codebook.replace(dead, new)
        # Twice the threshold: unused, a restarted code is re-seeded again after log(2)/(1 - decay) steps
        # (~70 at 0.99), short enough to recover from the first step's seeding by an untrained encoder.
        self.usage_ema[dead] = 2 * threshold
