"""The Hungarian matcher finds the minimum-cost assignment (checked by brute force)."""
import itertools

import pytest
import torch

from dino_core.matcher import HungarianMatcher


@pytest.mark.parametrize("seed,num_queries,num_targets", [(0, 4, 2), (1, 5, 3), (2, 3, 3), (3, 6, 1)])
def test_matcher_equals_brute_force(seed, num_queries, num_targets):
    g = torch.Generator().manual_seed(seed)
    outputs = {"pred_logits": torch.randn(1, num_queries, 5, generator=g),
               "pred_boxes": torch.rand(1, num_queries, 4, generator=g) * 0.5 + 0.1}
    targets = [{"labels": torch.randint(0, 5, (num_targets,), generator=g),
                "boxes": torch.rand(num_targets, 4, generator=g) * 0.5 + 0.1}]
    matcher = HungarianMatcher(2.0, 5.0, 2.0)
    src, tgt = matcher(outputs, targets)[0]
    cost = matcher.cost_matrix(outputs, targets)[0]
    got = cost[src, tgt].sum().item()
    best = min(sum(cost[q, t].item() for t, q in enumerate(perm))
               for perm in itertools.permutations(range(num_queries), num_targets))
    assert len(src) == num_targets and sorted(tgt.tolist()) == list(range(num_targets))
    assert got == pytest.approx(best, abs=1e-5)


def test_matcher_handles_images_without_targets():
    outputs = {"pred_logits": torch.randn(2, 4, 3), "pred_boxes": torch.rand(2, 4, 4) * 0.5 + 0.1}
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])},
               {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    (s0, t0), (s1, t1) = HungarianMatcher()(outputs, targets)
    assert len(s0) == 1 and len(s1) == 0 and len(t1) == 0
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    assert all(len(s) == 0 for s, _ in HungarianMatcher()(outputs, empty))
