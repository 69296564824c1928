"""Order extraction equals its naive reference; nll_under_order equals a direct computation; Gumbel
noise seeded per image gives the same orders however the images are batched, sharded or resumed."""

import math

import pytest
import torch

from datamodules.orders_file import finished_keys
from models.extraction import (
    ExtractionSettings,
    extract_orders,
    hash32,
    naive_extract_orders,
    nll_under_order,
    noise_seeds,
)
from models.orders import is_permutation, random_order
from tests.conftest import ORDERS, STAGE1_CKPT, copy_run, predict
from tests.test_pipeline import Crash
from tests.test_transformer import CLASSES, VOCAB, N, extend_all, tiny_net

COND = torch.tensor([1, 0, CLASSES])


def images(b: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, N), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("score", ["true_prob", "max_prob"])
@pytest.mark.parametrize("positions_per_step", [1, 3])
@pytest.mark.parametrize("gumbel_temperature,noise,options", [
    (0.0, "generator", {}), (0.5, "generator", {}), (0.5, "row_seeds", {}),
    (2.0, "row_seeds", {"choice_schedule": "linear"}), (0.0, "row_seeds", {"random_first": 4}),
    (1.0, "generator", {"choice_schedule": "linear", "random_first": 2}),
])
@pytest.mark.parametrize("next_pos,next_pos_layer,block", [("relative", 0, "gpt"), ("relative", 1, "gpt"),
                                                           ("target_rope", 0, "llama"), ("instruction", 0, "llama")])
def test_extraction_equals_naive(score, positions_per_step, gumbel_temperature, noise, options, next_pos,
                                 next_pos_layer, block):
    net = tiny_net(next_pos, "rope", seed=2, next_pos_layer=next_pos_layer, block=block)
    tokens = images()
    settings = ExtractionSettings(score=score, positions_per_step=positions_per_step,
                                  choice_temperature=gumbel_temperature, **options)
    seeds = noise_seeds(3, torch.arange(3), torch.tensor([0, 1, 0]))

    def source() -> dict:
        return {"generator": torch.Generator().manual_seed(3)} if noise == "generator" else {"row_seeds": seeds}

    fast = extract_orders(net, tokens, COND, settings, **source())
    slow = naive_extract_orders(net, tokens, COND, settings, **source())
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("positions_per_step", [2, 5, N])
def test_several_positions_per_step_give_permutations(positions_per_step):
    net, tokens = tiny_net("absolute", "learned"), images(4)
    settings = ExtractionSettings(positions_per_step=positions_per_step)
    order = extract_orders(net, tokens, torch.tensor([0, 1, 2, 3]), settings)
    assert order.shape == (4, N) and is_permutation(order)


def test_greedy_first_cell_is_the_most_likely_true_token():
    net, tokens = tiny_net(), images()
    order = extract_orders(net, tokens, COND)
    assert is_permutation(order)
    every_cell = torch.arange(N).expand(3, N)
    log_probs = torch.stack(
        [net(tokens, every_cell[:, c : c + 1], COND)[:, 0].log_softmax(-1) for c in range(N)], dim=1
    )  # (b, n, v): step 0, each cell as the target
    best = log_probs.gather(2, tokens[:, :, None]).squeeze(2).argmax(dim=1)
    assert torch.equal(order[:, 0], best)


def test_gumbel_noise_changes_orders_and_is_seeded():
    net, tokens = tiny_net(), images()
    greedy = extract_orders(net, tokens, COND)
    noisy = [
        extract_orders(net, tokens, COND, ExtractionSettings(choice_temperature=5.0),
                       generator=torch.Generator().manual_seed(s))
        for s in (0, 0, 1)
    ]
    assert torch.equal(noisy[0], noisy[1]) and not torch.equal(noisy[0], noisy[2])
    assert not torch.equal(noisy[0], greedy) and is_permutation(noisy[2])


def reference_hash32(x: int) -> int:
    """lowbias32 on Python integers (arbitrary precision), the definition `hash32` must match."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_hash32_matches_its_definition_without_int64_overflow():
    values = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, *torch.randint(0, 2**32, (200,)).tolist()]
    hashed = hash32(torch.tensor(values, dtype=torch.long)).tolist()
    assert hashed == [reference_hash32(v) for v in values]


def test_noise_seeds_differ_per_key_and_seed():
    index = torch.arange(500).repeat_interleave(2)
    flip = torch.tensor([0, 1]).repeat(500)
    seeds = noise_seeds(0, index, flip)
    assert seeds.dtype == torch.long and len(seeds.unique()) == 1000 and int(seeds.min()) >= 0
    assert int(seeds.max()) < 2**32
    assert torch.equal(seeds, noise_seeds(0, index, flip))
    assert (seeds != noise_seeds(1, index, flip)).all() and (seeds != noise_seeds(-1, index, flip)).all()


def keyed_orders(net, tokens, cond, keys, seed, rows) -> dict[tuple[int, int], list[int]]:
    """Orders of the given rows extracted in one batch, by (index, flip) key."""
    index, flip = keys[rows, 0], keys[rows, 1]
    order = extract_orders(net, tokens[rows], cond[rows], ExtractionSettings(choice_temperature=2.0),
                           row_seeds=noise_seeds(seed, index, flip))
    return {(int(i), int(f)): o.tolist() for i, f, o in zip(index, flip, order, strict=True)}


def test_row_seeded_gumbel_orders_do_not_depend_on_the_batch():
    net, tokens = tiny_net(), images(6, seed=4)
    cond = torch.tensor([0, 1, 2, 0, 1, CLASSES])
    keys = torch.tensor([[7, 0], [7, 1], [3, 0], [12, 0], [12, 1], [40, 0]])
    whole = keyed_orders(net, tokens, cond, keys, 0, torch.arange(6))
    split = {}  # other batches, in another order of keys: what a resumed or another process's run sees
    for rows in ([5, 1], [3], [0, 4, 2]):
        split |= keyed_orders(net, tokens, cond, keys, 0, torch.tensor(rows))
    assert split == whole
    greedy = extract_orders(net, tokens, cond)
    assert any(whole[tuple(k)] != g for k, g in zip(keys.tolist(), greedy.tolist(), strict=True))  # noise acts
    other_seed = keyed_orders(net, tokens, cond, keys, 1, torch.arange(6))
    assert sum(other_seed[k] != whole[k] for k in whole) >= 3


GUMBEL = ("--model.init_args.extraction.choice_temperature", "2.0")
CRASH = "tests.test_pipeline.CrashAfterFirstBatch"


@pytest.mark.slow
def test_gumbel_extraction_resumed_or_batched_otherwise_gives_the_same_orders(stage1_run, orders_run, tmp_path):
    """With Gumbel noise: an extraction killed after one batch and resumed equals one run in other batches."""
    resumed_dir, whole_dir = tmp_path / "resumed", tmp_path / "whole"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(copy_run(stage1_run, resumed_dir))
        with pytest.raises(Crash):
            predict("extract_orders", STAGE1_CKPT, *GUMBEL, f"--trainer.callbacks+={CRASH}")
        assert len(finished_keys(resumed_dir / ORDERS)) == 16  # one batch of 16 written
        predict("extract_orders", STAGE1_CKPT, *GUMBEL)
        mp.chdir(copy_run(stage1_run, whole_dir))
        predict("extract_orders", STAGE1_CKPT, *GUMBEL, "--data.init_args.batch_size", "7")
    resumed = torch.load(resumed_dir / ORDERS / "orders.pt", weights_only=True)
    whole = torch.load(whole_dir / ORDERS / "orders.pt", weights_only=True)
    greedy = torch.load(orders_run / ORDERS / "orders.pt", weights_only=True)
    done = whole["done"]
    assert torch.equal(resumed["done"], done) and int(done.sum()) > 16
    assert torch.equal(resumed["orders"][done], whole["orders"][done])
    assert not torch.equal(whole["orders"][done], greedy["orders"][done])  # the noise was on


def test_nll_under_order_equals_direct_computation():
    net, tokens = tiny_net("absolute", "rope"), images()
    order = random_order(3, N, torch.Generator().manual_seed(1))
    bits = nll_under_order(net, tokens, order, COND)
    with torch.no_grad():  # step by step through the cache, -log2 p(true token)
        logits = extend_all(net, net.new_cache(COND), tokens, order, [1] * N)
    log_p = logits.log_softmax(-1).gather(2, tokens.gather(1, order)[:, :, None]).squeeze(2)
    torch.testing.assert_close(bits, -log_p.mean(dim=1) / math.log(2), atol=1e-5, rtol=0)
    assert bits.shape == (3,)


def test_bad_settings_raise_naming_the_key():
    for kwargs in [{"score": "entropy"}, {"score": "sampled"}, {"positions_per_step": 0},
                   {"choice_schedule": "cosine"}, {"choice_temperature": -1.0}, {"random_first": -1}]:
        with pytest.raises(ValueError, match=f"model.init_args.extraction.{next(iter(kwargs))} = "):
            ExtractionSettings(**kwargs)


def test_deprecated_gumbel_keys_still_work_with_a_warning():
    """The extraction's noise keys of the earlier release mean the choice_* keys, with a warning naming them."""
    with pytest.warns(FutureWarning, match="write model.init_args.extraction.choice_temperature"):
        old = ExtractionSettings(gumbel_temperature=2.0, gumbel_schedule="linear")
    assert (old.choice_temperature, old.choice_schedule) == (2.0, "linear")
    assert "gumbel_temperature" not in old.record()
    net, tokens = tiny_net(), images()
    seeds = noise_seeds(0, torch.arange(3), torch.zeros(3, dtype=torch.long))
    new = ExtractionSettings(choice_temperature=2.0, choice_schedule="linear")
    assert torch.equal(extract_orders(net, tokens, COND, old, row_seeds=seeds),
                       extract_orders(net, tokens, COND, new, row_seeds=seeds))


def test_random_first_cells_ignore_the_scores_then_greedy_takes_over():
    """random_first k: the first k cells follow the noise alone (two models agree on them), the rest the model."""
    tokens, seeds = images(), noise_seeds(0, torch.arange(3), torch.zeros(3, dtype=torch.long))
    first = [extract_orders(tiny_net(seed=s), tokens, COND, ExtractionSettings(random_first=5), row_seeds=seeds)
             for s in (2, 3)]
    assert torch.equal(first[0][:, :5], first[1][:, :5]) and not torch.equal(first[0], first[1])
    greedy = extract_orders(tiny_net(seed=2), tokens, COND)
    assert not torch.equal(first[0][:, :5], greedy[:, :5])


def test_linear_schedule_is_greedy_at_the_end():
    """With the linear schedule the noise has vanished at the last steps: those choices are greedy; the same
    `ChoiceNoise` with per-row counts (the sampler's) gives the same scores as with one count for all rows."""
    from models.choice import ChoiceNoise

    noise = ChoiceNoise(3.0, "linear")
    scores, gumbel = torch.randn(2, 5), torch.randn(2, 5)
    assert torch.equal(noise.apply(scores, 10, 10, gumbel), scores)
    assert not torch.equal(noise.apply(scores, 0, 10, gumbel), scores)
    per_row = noise.apply(scores, torch.tensor([4, 4]), torch.tensor([10, 10]), gumbel)
    torch.testing.assert_close(per_row, noise.apply(scores, 4, 10, gumbel))
    first = ChoiceNoise(0.0, "constant", random_first=2)
    assert torch.equal(first.apply(scores, torch.tensor([1, 2]), 10, gumbel), torch.stack([gumbel[0], scores[1]]))
