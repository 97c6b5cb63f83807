import itertools

import pytest
import torch

from sparseattn.allocation import allocate_mean


def _instance(seed, G=4, H=5):
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(G, H, generator=g).sort(0).values
    recall = (0.3 + 0.7 * torch.rand(G, H, generator=g)).sort(0).values  # dearer keeps more, as in practice
    return recall, cost


def _brute(recall, cost, target):
    G, H = recall.shape
    best = None
    for combo in itertools.product(range(G), repeat=H):
        c = torch.tensor(combo)
        r = recall[c, torch.arange(H)].double().mean().item()
        k = cost[c, torch.arange(H)].double().mean().item()
        if r >= target and (best is None or k < best):
            best = k
    return best


@pytest.mark.parametrize("seed", range(6))
def test_reaches_target_on_the_hull_near_the_optimum(seed):
    recall, cost = _instance(seed)
    H = recall.shape[1]
    heads = torch.arange(H)
    top = recall.max(0).values.double().mean().item()
    low = recall.min(0).values.double().mean().item()
    costs = []
    for target in [low - 0.05] + [low + f * (top - low) for f in (0.2, 0.5, 0.8, 0.95, 1.0)]:
        choice = allocate_mean(recall, cost, target)
        got_r = recall[choice, heads].double().mean().item()
        got_c = cost[choice, heads].double().mean().item()
        assert got_r >= target - 1e-12
        # No head takes a dominated candidate (another with at least the recall at most the cost, one strictly).
        for h in range(H):
            r, c = recall[choice[h], h], cost[choice[h], h]
            dominated = ((recall[:, h] >= r) & (cost[:, h] <= c) & ((recall[:, h] > r) | (cost[:, h] < c))).any()
            assert not dominated
        # Within one head's largest cost step of the exact optimum.
        opt = _brute(recall, cost, target)
        assert got_c <= opt + (cost.max(0).values - cost.min(0).values).max().item() / H + 1e-9
        costs.append(got_c)
    assert costs == sorted(costs)  # a higher target never costs less


def test_exact_where_a_price_separates():
    recall = torch.tensor([[0.80, 0.50], [0.99, 0.98]])
    cost = torch.tensor([[0.10, 0.10], [0.30, 0.50]])
    assert allocate_mean(recall, cost, 0.6).tolist() == [0, 0]  # cheapest already reach it
    assert allocate_mean(recall, cost, 0.85).tolist() == [0, 1]  # head 1's +0.48 for 0.4 is the better buy
    assert allocate_mean(recall, cost, 0.95).tolist() == [1, 1]
    assert allocate_mean(recall, cost, 1.0).tolist() == [1, 1]  # unreachable: the most recall per head


def test_allowed_candidates_only():
    recall = torch.tensor([[0.5, 0.5], [0.9, 0.9], [1.0, 1.0]])
    cost = torch.tensor([[0.1, 0.1], [0.2, 0.2], [0.9, 0.9]])
    allowed = torch.tensor([[True, True], [True, False], [False, False]])
    choice = allocate_mean(recall, cost, 0.99, allowed=allowed)
    assert choice.tolist() == [1, 0]  # the best each may take
    none = torch.zeros_like(allowed)
    none[:, 0] = True
    assert allocate_mean(recall, cost, 0.99, allowed=none).tolist() == [2, 2]  # head 1: none allowed -> any


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="mean recall in"):
        allocate_mean(torch.ones(2, 2), torch.ones(2, 2), 1.5)
    with pytest.raises(ValueError, match="candidates, heads"):
        allocate_mean(torch.ones(2, 2), torch.ones(3, 2), 0.5)


@pytest.mark.parametrize("name", ["sparseattn.allocation", "sparseattn.search"])
def test_docstring_examples(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
