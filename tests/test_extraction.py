"""Order extraction equals its naive reference; nll_under_order equals a direct computation."""

import math

import pytest
import torch

from models.extraction import extract_orders, naive_extract_orders, nll_under_order
from models.orders import is_permutation, random_order
from tests.test_transformer import CLASSES, VOCAB, N, extend_all, tiny_net

COND = torch.tensor([1, 0, CLASSES])


def images(b: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, N), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("score", ["true_prob", "max_prob"])
@pytest.mark.parametrize("positions_per_step", [1, 3])
@pytest.mark.parametrize("gumbel_temperature", [0.0, 0.5])
def test_extraction_equals_naive(score, positions_per_step, gumbel_temperature):
    net, tokens = tiny_net("relative", "rope", seed=2), images()
    kwargs = dict(score=score, positions_per_step=positions_per_step, gumbel_temperature=gumbel_temperature)
    fast = extract_orders(net, tokens, COND, generator=torch.Generator().manual_seed(3), **kwargs)
    slow = naive_extract_orders(net, tokens, COND, generator=torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("positions_per_step", [2, 5, N])
def test_several_positions_per_step_give_permutations(positions_per_step):
    net, tokens = tiny_net("absolute", "learned"), images(4)
    order = extract_orders(net, tokens, torch.tensor([0, 1, 2, 3]), positions_per_step=positions_per_step)
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
        extract_orders(net, tokens, COND, gumbel_temperature=5.0, generator=torch.Generator().manual_seed(s))
        for s in (0, 0, 1)
    ]
    assert torch.equal(noisy[0], noisy[1]) and not torch.equal(noisy[0], noisy[2])
    assert not torch.equal(noisy[0], greedy) and is_permutation(noisy[2])


def test_nll_under_order_equals_direct_computation():
    net, tokens = tiny_net("absolute", "rope"), images()
    order = random_order(3, N, torch.Generator().manual_seed(1))
    bits = nll_under_order(net, tokens, order, COND)
    with torch.no_grad():  # step by step through the cache, -log2 p(true token)
        logits = extend_all(net, net.new_cache(COND), tokens, order, [1] * N)
    log_p = logits.log_softmax(-1).gather(2, tokens.gather(1, order)[:, :, None]).squeeze(2)
    torch.testing.assert_close(bits, -log_p.mean(dim=1) / math.log(2), atol=1e-5, rtol=0)
    assert bits.shape == (3,)


def test_bad_arguments_raise():
    net, tokens = tiny_net(), images()
    with pytest.raises(ValueError):
        extract_orders(net, tokens, COND, score="entropy")
    with pytest.raises(ValueError):
        extract_orders(net, tokens, COND, positions_per_step=0)
