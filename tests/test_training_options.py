"""Options of the AR modules: the raster-to-random curriculum, the order-choice noise each stage samples with."""

import pytest
import torch

from lightning_modules.any_order import AnyOrderModule
from lightning_modules.distill import DistillModule
from models.orders import is_permutation, raster_order
from models.sampling import NOISY_CHOICE_TEMPERATURE, SamplerSettings
from models.transformer import OrderedTransformer


def module(cls=AnyOrderModule, **kwargs) -> AnyOrderModule:
    return cls(net=OrderedTransformer(16, (4, 4), num_classes=2, width=16, depth=1, heads=2), **kwargs)


def test_curriculum_share_rises_from_the_start_share_to_one():
    m = module(curriculum_steps=100, curriculum_start=0.2)
    assert [m.random_share(s) for s in (0, 50, 100, 500)] == pytest.approx([0.2, 0.6, 1.0, 1.0])


def test_curriculum_orders_in_training_only():
    m = module(curriculum_steps=100, curriculum_start=0.0)  # step 0 (no trainer): every order raster
    batch = {"tokens": torch.zeros(32, 4, 4, dtype=torch.long)}
    assert torch.equal(m.orders_for(batch, "train"), raster_order(32, 16))
    val = m.orders_for(batch, "val")
    assert is_permutation(val) and not torch.equal(val, raster_order(32, 16))
    off = module().orders_for(batch, "train")
    assert not (off == raster_order(32, 16)).all(dim=1).any()


def test_curriculum_settings_checked():
    with pytest.raises(ValueError, match="curriculum_start"):
        module(curriculum_steps=10, curriculum_start=1.5)


@pytest.mark.parametrize("key,value", [("choice_schedule", "cosine"), ("random_first", -1), ("precision", "fp16")])
def test_extraction_settings_checked(key, value):
    from models.extraction import ExtractionSettings

    with pytest.raises(ValueError, match=rf"model\.init_args\.extraction\.{key} = "):
        ExtractionSettings(**{key: value})


def draws(rank: int = 0, step: int = 0, seed: int = 3, calls: int = 1) -> torch.Tensor:
    """The training orders a module draws for its `calls`-th batch at `step` on `rank`, the global generator
    in some other state each time."""
    from types import SimpleNamespace

    torch.manual_seed(torch.seed())  # the global generator anywhere: the draws must not depend on it
    m = module()
    m._trainer, m._draw_seed = SimpleNamespace(world_size=2, global_rank=rank, global_step=step), seed
    batch = {"tokens": torch.zeros(8, 4, 4, dtype=torch.long)}
    return [m.orders_for(batch, "train", m.train_generator()) for _ in range(calls)][-1]


def test_training_draws_depend_on_seed_rank_step_and_batch_only():
    """The same (seed, rank, step, batch within the step) draws the same orders whatever ran before, so a resumed
    fit draws what an uninterrupted one would; any other rank, step, accumulated batch or seed draws others."""
    assert torch.equal(draws(), draws())
    for other in (draws(rank=1), draws(step=1), draws(seed=4), draws(calls=2)):
        assert not torch.equal(draws(), other)


def test_draw_seed_travels_with_the_checkpoint():
    m, checkpoint = module(), {}
    m.on_fit_start()
    m._draw_seed = 17
    m.on_save_checkpoint(checkpoint)
    resumed = module()
    resumed.on_load_checkpoint(checkpoint)
    resumed.on_fit_start()  # a resume keeps the checkpoint's seed, not the new run's
    assert checkpoint["draw_seed"] == 17 and resumed._draw_seed == 17


def test_auto_choice_temperature_follows_how_the_model_was_trained():
    auto = SamplerSettings(choice_temperature="auto")
    assert module(sampler=auto).sampler.choice_temperature == NOISY_CHOICE_TEMPERATURE > 0  # random orders: noisy
    assert module(DistillModule, sampler=auto).sampler.choice_temperature == 0.0  # its own orders: greedy
    control = module(DistillModule, sampler=auto, random_order_prob=1.0)  # fine-tuned on random orders only
    assert control.sampler.choice_temperature == NOISY_CHOICE_TEMPERATURE
    assert module(DistillModule, sampler=auto).sampler_settings.choice_temperature == "auto"  # kept as configured
    assert module().sampler.choice_temperature == NOISY_CHOICE_TEMPERATURE  # the default (the callbacks' samples)
    assert module(DistillModule).sampler.choice_temperature == 0.0
    for cls in (AnyOrderModule, DistillModule):  # a number is used as given
        assert module(cls, sampler=SamplerSettings(choice_temperature=0.5)).sampler.choice_temperature == 0.5
