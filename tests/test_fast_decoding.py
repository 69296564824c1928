"""The decoding loop's speed mechanisms keep it exact: candidates in the cache's free slots, the incremental
list of unwritten cells, Gumbel-max token draws; the shortlist policy equals its naive reference and is
the exact policy at refresh 1."""

import pytest
import torch

from models.choice import ChoiceNoise
from models.orders import drop_cells, is_permutation, random_order
from models.sampling import (
    ConfidencePolicy,
    NoGuidance,
    SamplerSettings,
    ShortlistConfidencePolicy,
    TokenSampler,
    decode,
    naive_confidence_sample,
    sample,
)
from tests.test_transformer import CLASSES, VOCAB, N, batch, tiny_net

COND = torch.tensor([0, 2, CLASSES])


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_drop_cells_keeps_the_others_in_order():
    cells = torch.tensor([[3, 5, 7, 9], [0, 1, 2, 4]])
    assert drop_cells(cells, torch.tensor([[0], [3]])).tolist() == [[5, 7, 9], [0, 1, 2]]
    assert drop_cells(cells, torch.tensor([[2], [1]])).tolist() == [[3, 5, 9], [0, 2, 4]]
    assert drop_cells(cells, torch.tensor([[3, 0], [1, 2]])).tolist() == [[5, 7], [0, 4]]


def test_candidates_sit_in_the_free_slots_and_stale_ones_are_refused():
    net = tiny_net()
    tokens, order, cond = batch()
    cache = net.new_cache(cond)
    start = torch.full((3,), -1)
    _, first = net.score_candidates(cache, tokens[:, 0], start, order[:, :4])
    _, second = net.score_candidates(cache, tokens[:, 0], start, order[:, 4:6])  # overwrites the free slots
    with pytest.raises(ValueError, match="append right after scoring"):
        net.append_candidate(cache, first, torch.zeros(3, dtype=torch.long))
    net.append_candidate(cache, second, torch.ones(3, dtype=torch.long))
    assert cache.length == 1
    with pytest.raises(ValueError, match="free cache slots"):
        net.score_candidates(cache, tokens[:, 0], order[:, 0], order)  # n candidates, n - 1 free slots


def test_cache_follows_autocast():
    net = tiny_net()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net.new_cache(COND).kv.dtype == torch.bfloat16
    assert net.new_cache(COND).kv.dtype == torch.float32
    assert net.new_cache(COND, dtype=torch.float64).kv.dtype == torch.float64


def test_confidence_policy_keeps_its_unwritten_cells_current():
    net = tiny_net()
    seen = []

    class Recording(ConfidencePolicy):
        def candidates(self, t, written):
            cells = super().candidates(t, written)
            seen.append(torch.equal(cells, (~written).nonzero()[:, 1].view(len(written), -1)))
            return cells

    decode(net, COND, Recording(), NoGuidance(), TokenSampler(), gen())
    assert len(seen) == N and all(seen)  # the list equals the sorted unwritten cells at every step


def test_gumbel_max_draws_follow_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(20000, 4)
    draws = TokenSampler()(logits, gen())
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(freq, logits[0].softmax(0), atol=0.015, rtol=0)
    filtered = TokenSampler(top_k=2)(logits, gen())
    assert set(filtered.tolist()) == {0, 1}


@pytest.mark.parametrize("kwargs", [dict(), dict(cfg_scale=2.0, score="neg_entropy"), dict(choice_temperature=1.0)])
def test_shortlist_sampling_equals_its_naive_reference(kwargs):
    net = tiny_net("absolute", "rope", seed=1)
    settings = SamplerSettings(shortlist=3, refresh=4, **kwargs)
    fast = sample(net, COND, settings, generator=gen(7), choice_generator=gen(8), return_logits=True)
    slow = naive_confidence_sample(net, COND, settings, generator=gen(7), choice_generator=gen(8))
    assert is_permutation(fast.order)
    assert torch.equal(fast.order, slow.order) and torch.equal(fast.tokens, slow.tokens)
    torch.testing.assert_close(fast.logits, net(fast.tokens, fast.order, COND) if settings.cfg_scale == 1 else
                               slow.logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("shortlist,refresh", [(2, 1), (N, 5)])
def test_shortlist_that_never_prunes_is_the_exact_policy(shortlist, refresh):
    net = tiny_net(seed=2)
    exact = sample(net, COND, "confidence", generator=gen(3))
    short = sample(net, COND, SamplerSettings(shortlist=shortlist, refresh=refresh), generator=gen(3))
    assert torch.equal(exact.order, short.order) and torch.equal(exact.tokens, short.tokens)


def test_shortlist_rescores_few_cells_between_full_rankings():
    net = tiny_net()
    widths = []

    class Recording(ShortlistConfidencePolicy):
        def candidates(self, t, written):
            cells = super().candidates(t, written)
            widths.append(cells.shape[1])
            return cells

    decode(net, COND, Recording(shortlist=3, refresh=4), NoGuidance(), TokenSampler(), gen())
    assert widths[:6] == [N, 3, 3, 3, N - 4, 3]
    assert widths[-3:] == [3, 2, 1]  # once the shortlist covers every unwritten cell, all are scored
    widths.clear()
    first_two = ChoiceNoise(random_first=2)
    decode(net, COND, Recording(shortlist=3, refresh=4, noise=first_two), NoGuidance(), TokenSampler(), gen())
    assert widths[:4] == [N, N - 1, 3, 3]  # random first cells come from every unwritten cell


def test_shortlist_settings_are_checked():
    with pytest.raises(ValueError, match="sampler.refresh"):
        SamplerSettings(shortlist=2, refresh=0)
    with pytest.raises(ValueError, match="sampler.shortlist"):
        SamplerSettings(shortlist=-1)


def test_shortlist_under_inpainting_writes_the_known_cells_first():
    net = tiny_net()
    known = torch.zeros(3, N, dtype=torch.bool)
    known.scatter_(1, random_order(3, N, gen(4))[:, :5], True)
    out = sample(net, COND, SamplerSettings(shortlist=2, refresh=3), generator=gen(),
                 known_tokens=torch.randint(0, VOCAB, (3, N), generator=gen()), known_mask=known)
    assert is_permutation(out.order) and known.gather(1, out.order[:, :5]).all()
