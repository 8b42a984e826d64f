"""The block-parallel build's cost model: the ranges it picks and the timeline it predicts."""

from __future__ import annotations

import pytest

from reap import costmodel


@pytest.mark.parametrize("blocks,ranks,iters", [(60, 8, 200), (8, 2, 50), (9, 4, 20), (4, 4, 50), (61, 3, 0)])
def test_ranges_cover_every_block_once_and_finish_no_later_than_equal_ones(blocks, ranks, iters):
    sizes = [3.45] * blocks
    ranges = costmodel.plan_ranges(sizes, ranks, costmodel.GPU, iters, 64 * 512)
    assert len(ranges) == ranks and ranges[0][0] == 0 and ranges[-1][1] == blocks
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False)) and all(b > a for a, b in ranges)
    even = [(blocks * k // ranks, blocks * (k + 1) // ranks) for k in range(ranks)]
    wall = max(r.finish_s for r in costmodel.simulate(ranges, sizes, costmodel.GPU, iters, 64 * 512))
    assert wall <= max(r.finish_s for r in costmodel.simulate(even, sizes, costmodel.GPU, iters, 64 * 512)) + 1e-6


def test_later_ranks_get_no_more_blocks_since_their_inputs_come_later():
    ranges = costmodel.plan_ranges([3.45] * 60, 8, costmodel.GPU, 200, 64 * 512)
    sizes = [b - a for a, b in ranges]
    assert sizes[0] >= sizes[-1] and sum(sizes) == 60
    ranks = costmodel.simulate(ranges, [3.45] * 60, costmodel.GPU, 200, 64 * 512)
    assert [r.inputs_s for r in ranks] == sorted(r.inputs_s for r in ranks)  # handed down the ranks in turn
    assert ranks[-1].handed_s is None and all(r.handed_s is not None for r in ranks[:-1])


def test_a_slow_full_precision_pass_makes_the_first_range_small():
    """Each rank runs its range in full precision before the ranks after it can start: when that pass is slow,
    the first ranges shrink (they hand on sooner) and the last, which hands on nothing, grows."""
    slow = costmodel.Costs(**{**costmodel.GPU.__dict__, "forward_s_per_b": 30.0})
    fast = costmodel.plan_ranges([3.45] * 16, 4, costmodel.GPU, 200, 64 * 512)
    late = costmodel.plan_ranges([3.45] * 16, 4, slow, 200, 64 * 512)
    assert fast == [(0, 4), (4, 8), (8, 12), (12, 16)]
    assert late[0][1] < fast[0][1] and late[-1][1] - late[-1][0] > 4


def test_more_ranks_than_blocks_is_refused():
    with pytest.raises(ValueError):
        costmodel.plan_ranges([1.0] * 3, 4, costmodel.CPU, 50, 4096)
