"""The chain walk behind merged block status: right for any mix of layers,
and about one driver call per extent however deep the chain (asked range
by range, a chain of n overlays with one write each costs n * n / 2)."""

from __future__ import annotations

import random

import pytest

import corefmt
from tests.conftest import fill

BLOCK = 4096
BLOCKS = 64
SIZE = BLOCKS * BLOCK


def _make_chain(tmp_path, layers: list[list[tuple[int, str]]]) -> str:
    """A raw base of data, then one blockmap overlay per entry of ``layers``:
    (block, "data" | "zero") writes into it. Returns the top's path."""
    base = str(tmp_path / "base.raw")
    corefmt.create(base, "raw", SIZE)
    with corefmt.open(base, "raw") as disk:
        disk.write(0, fill(SIZE // 2, 1))  # the upper half stays a hole
    below, below_format = "base.raw", "raw"
    for number, writes in enumerate(layers):
        name = f"layer{number}.bm"
        corefmt.create(str(tmp_path / name), "blockmap", backing=below,
                       backing_format=below_format)
        with corefmt.open(str(tmp_path / name), backing=False) as disk:
            for block, kind in writes:
                if kind == "data":
                    disk.write(block * BLOCK, fill(BLOCK, number * BLOCKS + block))
                else:
                    disk.write_zeroes(block * BLOCK, BLOCK)
        below, below_format = name, "blockmap"
    return str(tmp_path / below)


def _reference(top) -> list[tuple[int, bool, bool, int]]:
    """(block, data, zero, depth) of every block, found by asking each layer
    about that block alone, top down."""
    layers = top.chain()
    answer = []
    for block in range(BLOCKS):
        for depth, layer in enumerate(layers):
            (own,) = layer.own_status(block * BLOCK, BLOCK)
            if own.allocated or depth == len(layers) - 1:
                data = own.data if own.allocated else False
                zero = own.zero if own.allocated else True
                answer.append((block, data, zero, depth if own.allocated else depth + 1))
                break
    return answer


def _per_block(extents) -> list[tuple[int, bool, bool, int]]:
    answer = []
    for extent in extents:
        assert extent.offset % BLOCK == 0 and extent.length % BLOCK == 0
        for block in range(extent.offset // BLOCK, extent.end // BLOCK):
            answer.append((block, extent.data, extent.zero, extent.depth))
    return answer


def _count_driver_calls(top) -> list[int]:
    calls = [0]
    for layer in top.chain():
        image = layer.image
        original = image.block_status

        def counting(offset, length, original=original):
            calls[0] += 1
            return original(offset, length)

        image.block_status = counting
    return calls


@pytest.mark.parametrize("seed", range(12))
def test_merged_status_equals_asking_every_layer_block_by_block(blockmap, tmp_path, seed):
    rng = random.Random(seed)
    layers = [[(block, rng.choice(["data", "data", "zero"]))
               for block in rng.sample(range(BLOCKS), rng.randrange(0, 12))]
              for _ in range(rng.randrange(1, 14))]
    top_path = _make_chain(tmp_path, layers)
    for read_only in (True, False):  # cached status and the uncached walk
        with corefmt.open(top_path, read_only=read_only) as top:
            expected = _reference(top)
            assert _per_block(top.block_status(0, SIZE)) == expected
            start = rng.randrange(BLOCKS) * BLOCK
            length = rng.randrange(1, BLOCKS - start // BLOCK + 1) * BLOCK
            assert _per_block(top.block_status(start, length)) == [
                entry for entry in expected if start <= entry[0] * BLOCK < start + length]
            # Above a base: what no layer above it decides has no node.
            chain = top.chain()
            base = chain[rng.randrange(1, len(chain))]
            above = top.block_status_above(base, 0, SIZE)
            cut = chain.index(base)
            for extent in above:
                for block in range(extent.offset // BLOCK, extent.end // BLOCK):
                    _, data, zero, depth = expected[block]
                    if depth < cut:
                        assert (extent.data, extent.zero, extent.depth) == (data, zero, depth)
                    else:
                        assert extent.node is None and not extent.data and not extent.zero


def test_a_deep_chain_costs_about_one_driver_call_per_extent(blockmap, tmp_path):
    # One block each, every other block, so each layer leaves a gap below it
    # (the one between its block and the next layer's): layer k from the
    # top is asked about k gaps.
    layers = [[(2 * number, "data")] for number in range(BLOCKS // 2)]
    top_path = _make_chain(tmp_path, layers)
    with corefmt.open(top_path, read_only=True) as top:
        calls = _count_driver_calls(top)
        extents = top.block_status(0, SIZE)
        # Each overlay answers: before its block, its block, after it (3),
        # and the base two runs. Range by range it would be over 32 * 31 / 2.
        assert calls[0] <= 3 * len(layers) + 2
        assert _per_block(extents) == _reference(top)
