# Shapes: b batch, H/W image size, d feature width.
"""FID and KID (torchmetrics) on a pluggable feature network: the one place both metrics are built.

torchmetrics computes both (`FrechetInceptionDistance`, `KernelInceptionDistance` with
`normalize=False`: uint8 images (b, 3, H, W) in [0, 255]) on either Inception (torch-fidelity's
pt_inception weights: a local file, or the torch hub cache) or any network that maps uint8 images to
features (b, d), such as the domain network of `evaluation.feature_net`. KID shares FID's network.

- `FidKid`: real and generated images fed in batches; the real features are kept across `compute`
  calls; with `sync_on_compute=True` the states are summed over torch.distributed processes when they
  compute (every process then holds the one-process value). Used by `callbacks.fid.FIDCallback`.
- `FeatureDistances`: the same against one fixed real set given at once (the comparison's set B).
- `load_reference_stats` + `FidKid.use_reference`: FID against precomputed statistics of the real set (an `.npz`
  holding Inception's `mu` and `sigma`, the format of ADM's ImageNet reference batches, e.g.
  VIRTUAL_imagenet256_labeled.npz), the way papers report ImageNet FID: no real image is read.

KID's random subsets come from a fixed seed, so the same two sets always give the same numbers.
"""

import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from torchmetrics.utilities import dim_zero_cat

from evaluation.weights import download_timeout

INCEPTION_URL = URL_INCEPTION_V3
INCEPTION_FILE = os.path.basename(URL_INCEPTION_V3)
KID_SEED = 0
REFERENCE_KEY = "fid.init_args.reference_stats"


def load_reference_stats(path: str | Path) -> tuple[Tensor, Tensor]:
    """mu (d,) and sigma (d, d), float64, of the real set from an `.npz` (keys `mu`, `sigma`: ADM's reference
    batches; other arrays such as `arr_0` are not read). Read as data (`allow_pickle=False`); one-line errors."""
    path = Path(path)
    fix = ("give an .npz with arrays mu (d,) and sigma (d, d) of Inception pool features (e.g. ADM's "
           f"VIRTUAL_imagenet256_labeled.npz) as {REFERENCE_KEY}")
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {path} ({REFERENCE_KEY}) not found: {fix}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k], dtype=np.float64) for k in ("mu", "sigma") if k in data.files}
            names = list(data.files)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"reference statistics {path} ({REFERENCE_KEY}) are not a readable .npz: {fix}") from err
    if len(arrays) < 2:
        raise ValueError(f"reference statistics {path} ({REFERENCE_KEY}) hold no mu and sigma (arrays: "
                         f"{', '.join(names) or 'none'}): {fix}")
    mu, sigma = torch.from_numpy(arrays["mu"]), torch.from_numpy(arrays["sigma"])
    d = mu.numel()
    if mu.dim() != 1 or tuple(sigma.shape) != (d, d) or not (mu.isfinite().all() and sigma.isfinite().all()):
        raise ValueError(f"reference statistics {path} ({REFERENCE_KEY}) have mu {tuple(mu.shape)} and sigma "
                         f"{tuple(sigma.shape)} (finite numbers of shapes (d,) and (d, d) expected): {fix}")
    return mu, sigma


class FidKid(nn.Module):
    """FID (and KID) of generated images against real images, both fed in batches.

    The feature network is always used in eval mode (its BatchNorm keeps its running statistics).

    Args:
        feature_net: uint8 (b,3,H,W) -> features (b,d); give it a `num_features` attribute or it is
            probed once with a dummy image of `input_img_size`. None: Inception.
        inception_weights: torch-fidelity pt_inception file (`INCEPTION_FILE`); None: the torch hub cache
            (downloaded from `INCEPTION_URL` when online, with a bounded socket timeout).
        feature_dim: Inception feature layer: 64, 192, 768 or 2048 (the standard FID).
        kid: also KID (mean over subsets).
        kid_subsets: KID subsets.
        input_img_size: (3, H, W) of the images, for probing a `feature_net` without `num_features`.
        sync_on_compute: sum the states over torch.distributed processes when computing.
    """

    def __init__(self, feature_net: nn.Module | None = None, inception_weights: str | None = None,
                 feature_dim: int = 2048, kid: bool = True, kid_subsets: int = 100,
                 input_img_size: tuple[int, int, int] = (3, 299, 299), sync_on_compute: bool = False):
        super().__init__()
        common = {"reset_real_features": False, "sync_on_compute": sync_on_compute}
        if feature_net is not None:
            fid = FrechetInceptionDistance(feature=feature_net, input_img_size=input_img_size, **common)
        else:
            if inception_weights is not None and not Path(inception_weights).is_file():
                raise FileNotFoundError(f"weights_path {inception_weights!r} does not exist")
            with download_timeout():
                fid = FrechetInceptionDistance(feature=feature_dim, feature_extractor_weights_path=inception_weights,
                                               **common)
        self.fid = fid
        # Handing KID the FID's network shares the weights (KID itself cannot take a weights path).
        self.kid = KernelInceptionDistance(feature=fid.inception, subsets=kid_subsets, **common) if kid else None
        self.eval()

    def train(self, mode: bool = True) -> "FidKid":
        """Stays in eval mode: features never depend on the batch they come in."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.fid.device

    @torch.no_grad()
    def update(self, images: Tensor, real: bool) -> None:
        """Add uint8 images (b,3,H,W) to the real or the generated set."""
        for metric in (self.fid, self.kid):
            if metric is not None:
                metric.update(images.to(self.device), real=real)

    @torch.no_grad()
    def compute(self, kid_subset_size: int | None = None) -> dict[str, float]:
        """{"fid"} (and {"kid"}) of the generated images so far; then the generated set is emptied.

        Under `sync_on_compute` every process must call it.

        Args:
            kid_subset_size: images per KID subset; default min(1000, real images, generated images)
                of this process (give the total under torch.distributed).
        """
        try:
            scores = {"fid": float(self.fid.compute())}
            if self.kid is not None:
                scores["kid"] = self._kid(kid_subset_size)
        finally:
            for metric in (self.fid, self.kid):
                if metric is not None:
                    metric.reset()  # keeps the real features (reset_real_features=False)
        return scores

    @torch.no_grad()
    def use_reference(self, mu: Tensor, sigma: Tensor, here: bool = True) -> None:
        """Make precomputed statistics (`load_reference_stats`) the real set, in place of real images.

        The FID keeps the real set as sums (features, outer products, count); sums that give back exactly mu and
        sigma are set (the count cancels; 2 is enough). Under torch.distributed the states are summed over
        processes, so only one process holds them (`here`), the others zeros. KID needs the real features
        themselves: it is refused.
        """
        if self.kid is not None:
            raise ValueError(f"KID needs real images, not statistics: set fid.init_args.kid false with {REFERENCE_KEY}")
        fid, count = self.fid, 2
        if mu.numel() != fid.real_features_sum.numel():
            raise ValueError(f"the reference statistics are of {mu.numel()} features, the FID network gives "
                             f"{fid.real_features_sum.numel()}: set fid.init_args.feature_dim to {mu.numel()} "
                             "(Inception pool3: 2048), or give statistics of this network")
        mu = mu.to(fid.real_features_sum.device, torch.float64)
        sigma = sigma.to(mu.device, torch.float64)
        scale = 1.0 if here else 0.0
        fid.real_features_sum = scale * count * mu
        fid.real_features_cov_sum = scale * ((count - 1) * sigma + count * torch.outer(mu, mu))
        fid.real_features_num_samples = torch.tensor(count if here else 0, device=mu.device)

    def _kid(self, subset_size: int | None) -> float:
        kid = self.kid
        # KID keeps lists of feature tensors and gathers them one by one: one tensor per process, or
        # processes with different numbers of batches would pair up mismatched collectives.
        kid.real_features, kid.fake_features = [dim_zero_cat(kid.real_features)], [dim_zero_cat(kid.fake_features)]
        kid.subset_size = subset_size or min(1000, len(kid.real_features[0]), len(kid.fake_features[0]))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(KID_SEED)
            return float(kid.compute()[0])  # (mean, std) over subsets


class FeatureDistances(FidKid):
    """FID and KID (mean over subsets) of any image set against `real`.

    Args:
        real: uint8 (M, 3, H, W), the reference set every call compares with.
        feature_net: the feature network.
        inception_weights: a torch-fidelity pt_inception file: Inception pool3 (2048-d) instead.
        batch_size: images per feature-extraction batch.
        kid_subsets: KID subsets (of min(1000, set sizes) images each).
        device: where features are computed.
    """

    def __init__(self, real: Tensor, feature_net: nn.Module | None = None, inception_weights: str | None = None,
                 batch_size: int = 256, kid_subsets: int = 50, device: str | torch.device = "cpu"):
        if feature_net is None and not inception_weights:
            raise ValueError("FeatureDistances needs a feature_net or an inception_weights file")
        super().__init__(None if inception_weights else feature_net, inception_weights, kid_subsets=kid_subsets)
        self.batch_size = batch_size
        self.to(device)
        for x in real.split(batch_size):
            self.update(x, real=True)

    def forward(self, fake: Tensor) -> dict[str, float]:
        """{"fid", "kid"} of uint8 images `fake` (N, 3, H, W) against the real set (N >= 2)."""
        for x in fake.split(self.batch_size):
            self.update(x, real=False)
        return self.compute()
