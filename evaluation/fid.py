"""FID and KID of image sets against one fixed set of real images, in one feature space.

torchmetrics computes both (`FrechetInceptionDistance`, `KernelInceptionDistance` with
`normalize=False`: uint8 images in [0, 255]) on either Inception (a local torch-fidelity weights file)
or any network that maps uint8 images (b, 3, H, W) to features (b, d), such as the domain network of
`evaluation.feature_net`. The real features are computed once; KID's random subsets come from a fixed
seed, so the same two sets always give the same numbers.
"""

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance


class FeatureDistances(nn.Module):
    """FID and KID (mean over subsets) of any image set against `real`.

    Args:
        real: uint8 (M, 3, H, W), the reference set every call compares with.
        feature_net: the feature network (kept in eval mode: its BatchNorm uses running statistics).
        inception_weights: a torch-fidelity pt_inception file: Inception pool3 (2048-d) instead.
        batch_size: images per feature-extraction batch.
        kid_subsets: KID subsets (of min(1000, set sizes) images each).
        device: where features are computed.
    """

    def __init__(self, real: Tensor, feature_net: nn.Module | None = None, inception_weights: str | None = None,
                 batch_size: int = 256, kid_subsets: int = 50, device: str | torch.device = "cpu"):
        super().__init__()
        if inception_weights:
            fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=inception_weights,
                                           reset_real_features=False)
        elif feature_net is not None:
            fid = FrechetInceptionDistance(feature=feature_net.eval(), reset_real_features=False)
        else:
            raise ValueError("FeatureDistances needs a feature_net or an inception_weights file")
        kid = KernelInceptionDistance(feature=fid.inception, subset_size=min(1000, len(real)), subsets=kid_subsets,
                                      reset_real_features=False)
        self.fid, self.kid, self.batch_size, self.num_real = fid.to(device), kid.to(device), batch_size, len(real)
        self.eval()
        with torch.no_grad():
            for x in real.split(batch_size):
                for metric in (self.fid, self.kid):
                    metric.update(x.to(self.fid.device), real=True)

    @torch.no_grad()
    def forward(self, fake: Tensor) -> dict[str, float]:
        """{"fid", "kid"} of uint8 images `fake` (N, 3, H, W) against the real set (N >= 2)."""
        for metric in (self.fid, self.kid):
            metric.reset()  # keeps the real features
            for x in fake.split(self.batch_size):
                metric.update(x.to(self.fid.device), real=False)
        self.kid.subset_size = min(1000, self.num_real, len(fake))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            kid = float(self.kid.compute()[0])
        return {"fid": float(self.fid.compute()), "kid": kid}
