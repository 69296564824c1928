"""The evaluation package: the multi-task feature network, FID/KID against a fixed real set, and the
ranking a trustworthy metric must give (real < blurred < shuffled patches < noise)."""

import pytest
import torch

from datamodules.sources import SunsetSource
from datamodules.sources.synthetic import num_cloud_tints
from evaluation import (
    FeatureDistances,
    SmallConvNetFeatures,
    class_heads,
    head_scores,
    label_accuracy,
    targets_for,
    train_feature_net,
)
from evaluation.degrade import blur, shuffle_patches, uniform_noise


def two_class_images(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Dark images (class 0) and bright images (class 1) with noise: uint8 (n,3,32,32), labels (n,)."""
    labels = torch.arange(n) % 2
    base = (60 + 120 * labels).view(n, 1, 1, 1).float()
    noise = torch.randn(n, 3, 32, 32, generator=generator) * 20
    return (base + noise).clamp(0, 255).to(torch.uint8), labels


def test_feature_net_trains_a_classifier_and_serves_feature_distances():
    gen = torch.Generator().manual_seed(0)
    images, labels = two_class_images(64, gen)
    net = SmallConvNetFeatures(class_heads(2), width=8, feature_dim=16)
    info = train_feature_net(net, images, {"class": labels}, max_epochs=10, batch_size=16)
    assert info["steps"] == 40 and not info["capped"] and not net.training  # BatchNorm running stats settle
    assert head_scores(net, images, {"class": labels})["class"]["accuracy"] > 0.9
    assert label_accuracy(net, "class", images, labels) > 0.9
    assert label_accuracy(net, "class", images, 1 - labels) < 0.1  # samples that ignore their label show it
    assert net(images[:5]).shape == (5, 16)
    with pytest.raises(TypeError):
        net(images.float())  # uint8 in [0, 255] only: the convention of FID/KID with normalize=False

    dark, bright = images[labels == 0], images[labels == 1]
    distances = FeatureDistances(dark[:16], net)
    same, different = distances(dark[16:]), distances(bright)
    assert different["fid"] > 10 * max(same["fid"], 1e-3) and different["kid"] > same["kid"]
    assert distances(dark[16:]) == same  # real features kept; KID's subsets drawn from a fixed seed
    assert not net.training  # the metrics keep the network's BatchNorm in eval mode


def test_regression_heads_predict_in_the_targets_units():
    """A brightness regressed through the standardised head comes back in its own units (not z-scores)."""
    gen = torch.Generator().manual_seed(1)
    value = 0.3 + 0.4 * torch.rand(96, generator=gen)  # the target, in [0.3, 0.7]
    images = (value.view(-1, 1, 1, 1) * 255 + torch.randn(96, 3, 16, 16, generator=gen) * 5).clamp(0, 255)
    images = images.to(torch.uint8)
    net = SmallConvNetFeatures({"value": 1, "bright": 2}, width=8, feature_dim=16)
    targets = {"value": value, "bright": (value > 0.5).long()}
    train_feature_net(net, images, targets, max_epochs=30, batch_size=32, flip=False)
    assert net.target_stats[0, 0] == pytest.approx(float(value.mean()), abs=1e-5)
    scores = head_scores(net, images, targets)
    assert scores["value"]["r2"] > 0.8 and scores["value"]["mae"] < 0.05
    assert scores["bright"]["accuracy"] > 0.85
    with pytest.raises(ValueError, match="heads"):
        SmallConvNetFeatures({"empty": 0})


def test_targets_for_sunsets_are_the_scene_factors_and_else_the_class():
    source = SunsetSource(num_images=20, seed=5)
    indices = torch.tensor([3, 7])
    heads, targets, label_head = targets_for(source, indices, torch.zeros(2))
    assert label_head == "hue" and heads["hue"] == 8 and heads["cloud_tint"] == num_cloud_tints(8)
    assert heads["sun_x"] == 1 and set(targets) == set(heads)
    params = source.sample_params(7)
    assert targets["sun_x"][1] == pytest.approx(params.sun_x) and targets["hue"][1] == params.hue
    assert targets["clouds"][1] == len(params.clouds) and 0 < targets["cloud_cover"][1] < 1
    assert targets_for(SunsetSource(num_images=5, conditional=False), indices, torch.zeros(2))[2] is None

    class Plain(torch.utils.data.Dataset):
        num_classes = 10

    heads, targets, label_head = targets_for(Plain(), indices, torch.tensor([4, 9]))
    assert heads == {"class": 10} and targets["class"].tolist() == [4, 9] and label_head == "class"


def test_degradations_keep_shape_and_what_they_should():
    images = SunsetSource(num_images=4, seed=9)[0][0][None].repeat(4, 1, 1, 1)
    gen = torch.Generator().manual_seed(0)
    shuffled = shuffle_patches(images, 8, gen)
    assert shuffled.shape == images.shape and shuffled.dtype == torch.uint8
    assert not torch.equal(shuffled, images)
    for a, b in zip(shuffled, images, strict=True):  # the same pixels, moved
        assert torch.equal(a.flatten(1).sort(1).values, b.flatten(1).sort(1).values)
    blurred = blur(images, 1.0)
    assert blurred.dtype == torch.uint8 and not torch.equal(blurred, images)
    assert (blurred.float().mean() - images.float().mean()).abs() < 3
    noise = uniform_noise(images, gen)
    assert noise.shape == images.shape and noise.dtype == torch.uint8


@pytest.mark.slow  # ~10-20 s on a busy 2-core CPU: trains a small scene network
def test_fid_ranks_real_blurred_shuffled_noise_in_a_scene_feature_space():
    train = SunsetSource(num_images=640, seed=11)
    heads, targets, _ = targets_for(train, torch.arange(640), torch.zeros(640))
    images = torch.stack([train[i][0] for i in range(640)])
    torch.manual_seed(0)
    net = SmallConvNetFeatures(heads, width=8, feature_dim=64)
    train_feature_net(net, images, targets, max_epochs=6, batch_size=64, flip=False)

    held_out = SunsetSource(num_images=400, seed=12)  # two disjoint real sets the network never saw
    real = torch.stack([held_out[i][0] for i in range(400)])
    a, b = real[:200], real[200:]
    distances = FeatureDistances(b, net)
    gen = torch.Generator().manual_seed(0)
    fid = {name: distances(x)["fid"] for name, x in [
        ("real", a), ("blurred", blur(a, 1.0)), ("shuffled", shuffle_patches(a, 8, gen)),
        ("noise", uniform_noise(a, gen))]}
    assert fid["real"] < fid["blurred"] < fid["shuffled"] < fid["noise"], fid
    assert fid["blurred"] > 2 * fid["real"], fid  # measured: real 1.6, blurred 19.6, shuffled 27.7, noise 1480
