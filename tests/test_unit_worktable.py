"""The work table's pure parts: how items are numbered into lanes, and how
they travel as JSON. No database."""

from __future__ import annotations

import pytest

from jobrunner.exceptions import ItemNotPortable
from jobrunner.worktable import LANES, block_seq, decode, encode


@pytest.mark.parametrize("batch", [1, 7, 100, 1000])
def test_each_batch_of_consecutive_items_shares_a_lane_in_order(batch):
    count = 3 * LANES * batch + batch // 2  # three full rounds of lanes and part of a fourth
    seqs = [block_seq(index, batch) for index in range(count)]
    assert len(set(seqs)) == count, "two items got the same seq"
    for start in range(0, count, batch):
        block = seqs[start : start + batch]
        assert len({seq % LANES for seq in block}) == 1, f"items {start}.. span lanes"
    by_lane: dict[int, list[int]] = {}
    for seq in seqs:
        by_lane.setdefault(seq % LANES, []).append(seq)
    assert all(lane == sorted(lane) for lane in by_lane.values()), "a lane's seqs go back in feed order"
    assert max(seqs) < 4 * LANES * batch  # no sparse numbering: four rounds' worth of seqs


def test_batch_one_numbers_items_one_by_one():
    assert [block_seq(index, 1) for index in range(300)] == list(range(300))


def test_items_come_back_equal_and_of_the_same_type():
    for item in [1, -2.5, "text", None, True, (1, "a"), [1, [2, 3]], {"k": (1, 2), 3: None}, ((1, 2), [3])]:
        back = decode(encode(item))
        assert back == item and type(back) is type(item)


def test_an_object_cannot_travel():
    with pytest.raises(ItemNotPortable, match="cannot travel"):
        encode(object())
