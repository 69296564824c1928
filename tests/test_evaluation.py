"""The evaluation package: the multi-task feature network, FID/KID against a fixed real set, the ranking a
trustworthy metric must give (real < blurred < shuffled patches < noise), diversity, scene rates, mean
order maps and the seeded sampling loop."""

import dataclasses
import math

import numpy as np
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
from evaluation.diversity import diversity
from evaluation.fid import FidKid
from evaluation.order_stats import mean_step_map, per_class_mean_maps
from evaluation.sampling import cycle_labels, eval_mode, generate_batches, sample_set
from evaluation.scene import content_steps, scene_rates
from models.orders import order_to_step_map, random_order


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


def test_scene_rates_count_missing_suns_and_clouds():
    source = SunsetSource(num_images=40, seed=505)
    no_clouds = torch.stack([source.render(dataclasses.replace(source.sample_params(i), clouds=()))
                             for i in range(20)])
    rates = scene_rates(no_clouds)
    assert rates["sun_share"] >= 0.95 and rates["cloud_share"] == 0.0 and rates["consistency"] == 0.0
    black = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    assert scene_rates(black) == {"consistency": 0.0, "sun_share": 0.0, "cloud_share": 0.0}


def test_content_steps_say_when_an_order_writes_the_sun():
    """An order that writes the sun's cells first scores a low sun step, its reverse a high one, random orders
    about 0.5 for every kind of cell; images without a sun or clouds give nan for them."""
    from datamodules.sources.synthetic import sunset_pixels
    from models.orders import order_to_step_map, random_order

    source = SunsetSource(num_images=24, seed=505)
    images = torch.stack([source.render(source.sample_params(i)) for i in range(24)])
    sun_cells = torch.nn.functional.adaptive_max_pool2d(sunset_pixels(images)[0].float()[:, None], (8, 8)).flatten(1)
    sun_first = (-sun_cells + 1e-3 * torch.rand(24, 64, generator=torch.Generator().manual_seed(0))).argsort(1)
    first = content_steps(images, order_to_step_map(sun_first, 8, 8))
    last = content_steps(images, order_to_step_map(sun_first.flip(1), 8, 8))
    assert first["sun_step"] < 0.15 and last["sun_step"] > 0.85 and first["rest_step"] > first["sun_step"]
    many = images.repeat(20, 1, 1, 1)
    rand = content_steps(many, order_to_step_map(random_order(len(many), 64, torch.Generator().manual_seed(1)), 8, 8))
    assert all(abs(v - 0.5) < 0.05 for v in rand.values()), rand
    black = content_steps(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.arange(64).view(1, 8, 8).repeat(2, 1, 1))
    assert math.isnan(black["sun_step"]) and math.isnan(black["cloud_step"]) and black["rest_step"] == 0.5


def test_fid_kid_keeps_its_feature_network_in_eval_mode_and_its_real_features():
    net = SmallConvNetFeatures(class_heads(2), width=4, feature_dim=8)
    metric = FidKid(net, kid_subsets=5)
    metric.train()  # e.g. a parent module switched to training
    assert not metric.training and not net.training  # BatchNorm would otherwise use the batch's statistics
    gen = torch.Generator().manual_seed(0)
    real, _ = two_class_images(16, gen)
    metric.update(real, real=True)
    metric.update(real[:8], real=False)
    first = metric.compute()
    metric.update(real[:8], real=False)  # the generated set was emptied, the real one kept
    assert metric.compute() == first and set(first) == {"fid", "kid"}


def test_mean_maps_take_orders_with_their_grid_or_step_maps_as_arrays():
    orders = random_order(6, 12, torch.Generator().manual_seed(0))
    maps = order_to_step_map(orders, 3, 4)
    assert torch.equal(mean_step_map(orders, 3, 4), mean_step_map(maps))
    assert torch.equal(mean_step_map(maps.numpy()), maps.double().mean(0).float())  # an .npz dump read back
    labels = np.array([0, 1, 0, 1, 0, 1])
    assert torch.equal(per_class_mean_maps(maps.numpy(), labels, 2), per_class_mean_maps(orders, labels, 2, 3, 4))
    with pytest.raises(ValueError, match="grid"):
        mean_step_map(orders)  # orders need their grid
    assert torch.isnan(mean_step_map(orders[:0], 3, 4)).all()


def test_diversity_is_zero_for_copies_and_larger_for_varied_images():
    torch.manual_seed(0)
    net = SmallConvNetFeatures(class_heads(2), width=4, feature_dim=8).eval()
    varied, _ = two_class_images(8, torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])  # class 2 has one image: left out
    copies = varied[:1].expand(8, -1, -1, -1)
    assert diversity(copies, labels, net) == pytest.approx(0.0, abs=1e-6)
    assert diversity(varied, labels, net) > 1e-3  # a random network's features still tell images apart
    with pytest.raises(ValueError, match="feature_net or an lpips"):
        diversity(varied, labels)


class Sampler(torch.nn.Module):
    """The sampling interface of the AR module: images whose pixels are the generator's first draws."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.calls = []

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def generate(self, labels, generator=None, policy=None, choice_generator=None) -> dict:
        self.calls.append((len(labels), generator.initial_seed(), self.training, torch.is_grad_enabled()))
        images = torch.randint(0, 256, (len(labels), 3, 4, 4), generator=generator, dtype=torch.uint8)
        return {"images": images, "step_map": torch.zeros(len(labels), 2, 2, dtype=torch.long), "labels": labels}


def test_sample_set_draws_chunk_j_with_seed_plus_j_in_eval_mode():
    module = Sampler()
    out = sample_set(module, 7, batch_size=3, seed=10)
    assert module.training  # its mode comes back
    assert module.calls == [(3, 10, False, False), (3, 11, False, False), (1, 12, False, False)]
    assert out["labels"].tolist() == cycle_labels(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert out["images"].shape == (7, 3, 4, 4) and out["seconds"] >= 0
    with eval_mode(module):  # process 1 of 2 draws chunk 1 only: the same images as in the whole set
        [share] = generate_batches(module, cycle_labels(7, 3), 3, 10, rank=1, world_size=2)
    assert torch.equal(share["images"], out["images"][3:6])


class SunsetData:
    """What `feature_net_for` reads of a DataModule: the source and the split."""

    source = SunsetSource(num_images=24, seed=21)

    def split_indices(self):
        return torch.arange(16), torch.arange(16, 24)


def test_feature_network_is_trained_once_cached_and_retrained_when_damaged(tmp_path, monkeypatch, caplog):
    from evaluation import feature_cache

    path, check = tmp_path / "features.pt", torch.arange(16, 20)
    net, info = feature_cache.feature_net_for(SunsetData(), path, epochs=1, feature_images=16, check=check)
    assert path.is_file() and info["label_head"] == "hue" and "sun_x" in info["scores"] and not net.training

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(feature_cache, "train_feature_net", no_training)
    again, info_again = feature_cache.feature_net_for(SunsetData(), path, epochs=1, feature_images=16, check=check)
    assert info_again == info and all(torch.equal(a, b) for a, b in zip(again.state_dict().values(),
                                                                         net.state_dict().values(), strict=True))
    path.write_bytes(b"half a file")
    with pytest.raises(AssertionError, match="trained again"):  # a damaged cache is not trusted
        feature_cache.feature_net_for(SunsetData(), path, epochs=1, feature_images=16, check=check)
    assert "unreadable" in caplog.text


def test_feature_network_does_not_depend_on_the_global_random_state(tmp_path):
    """Two runs train the same feature network (else FIDs of two runs are in two feature spaces)."""
    from evaluation import feature_cache

    nets = []
    for state in (1, 2):
        torch.manual_seed(state)
        net, _ = feature_cache.feature_net_for(SunsetData(), tmp_path / f"features{state}.pt", epochs=1,
                                               feature_images=16, check=torch.arange(16, 20))
        nets.append(net.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(nets[0].values(), nets[1].values(), strict=True))
