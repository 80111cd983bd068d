"""Sequence hashes, by example: the same numbers Dynamo's KV router computes for the same tokens."""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from kvbm_builder.blocks import XXH3_SEED, TokenBlock, chain_hash, local_block_hash, sequence_hashes, token_blocks
from kvbm_builder.errors import KvbmError, SequenceHashError


def router_local_hash(tokens: list[int]) -> int:
    """Upstream's compute_block_hash_for_seq for one block, written out independently."""
    return xxhash.xxh3_64_intdigest(struct.pack(f"<{len(tokens)}I", *tokens), seed=1337)


def router_sequence_hashes(tokens: list[int], block_size: int) -> list[int]:
    """Upstream's compute_seq_hash_for_block over the full blocks, written out independently."""
    out: list[int] = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        local = router_local_hash(tokens[start : start + block_size])
        parent = out[-1] if out else None
        out.append(local if parent is None else xxhash.xxh3_64_intdigest(struct.pack("<QQ", parent, local), seed=1337))
    return out


def test_the_seed_is_upstreams_and_agrees_with_its_pinned_vector() -> None:
    # lib/kv-router's protocol test pins compute_block_hash(b"test data") == LocalBlockHash(13226331709069118873)
    assert XXH3_SEED == 1337
    assert xxhash.xxh3_64_intdigest(b"test data", seed=XXH3_SEED) == 13226331709069118873


def test_three_blocks_of_four_tokens_by_number() -> None:
    tokens = list(range(14))  # three full blocks of 4 and a tail of 2, which is not hashed
    assert local_block_hash([0, 1, 2, 3]) == 9143094415614847814
    assert local_block_hash([4, 5, 6, 7]) == 12124091508212882195
    assert sequence_hashes(tokens, 4) == [9143094415614847814, 9510318385840434533, 16998148715716822651]
    assert sequence_hashes(tokens, 4) == router_sequence_hashes(tokens, 4)


def test_the_first_block_is_its_own_sequence_hash_and_the_next_chains_on_it() -> None:
    first, second = token_blocks([0, 1, 2, 3, 4, 5, 6, 7], 4)
    assert first.sequence_hash == first.local_hash and first.parent_hash is None
    assert second.parent_hash == first.sequence_hash
    assert second.sequence_hash == chain_hash(first.sequence_hash, second.local_hash or 0)
    assert second.tokens == (4, 5, 6, 7)


def test_a_sequence_continues_from_a_parent_block() -> None:
    whole = token_blocks(list(range(12)), 4)
    rest = token_blocks(list(range(4, 12)), 4, parent=whole[0])
    assert rest == whole[1:]
    assert token_blocks(list(range(4, 12)), 4, parent=whole[0].sequence_hash) == whole[1:]
    assert TokenBlock.from_tokens([8, 9, 10, 11], parent=whole[1]) == whole[2]


def test_a_partial_tail_has_no_block() -> None:
    assert token_blocks([1, 2, 3], 4) == []
    assert len(token_blocks(list(range(9)), 4)) == 2


def test_a_block_known_by_an_engine_hash_is_registered_under_it() -> None:
    block = TokenBlock.from_hash(0xDEADBEEF, parent_hash=7, tokens=[1, 2])
    assert (block.sequence_hash, block.external_hash, block.parent_hash, block.local_hash) == (
        0xDEADBEEF,
        0xDEADBEEF,
        7,
        None,
    )
    # engines that send signed 64-bit hashes: the same bits, as upstream's From<i64>
    assert TokenBlock.from_hash(-1).sequence_hash == 2**64 - 1


def test_hashed_blocks_can_carry_the_engines_own_hashes() -> None:
    blocks = token_blocks(list(range(8)), 4, external_hashes=[111, 222])
    assert [b.external_hash for b in blocks] == [111, 222]
    assert [b.sequence_hash for b in blocks] == sequence_hashes(list(range(8)), 4)
    with pytest.raises(SequenceHashError, match="one hash per full block"):
        token_blocks(list(range(8)), 4, external_hashes=[1])


@pytest.mark.parametrize(
    ("tokens", "where"),
    [([1, -1, 2, 3], r"tokens\[1\] = -1"), ([1, 2, 2**32, 3], r"tokens\[2\]"), ([1.5, 2, 3, 4], r"tokens\[0\]")],
)
def test_a_token_outside_u32_is_an_error_naming_its_position(tokens: list[int], where: str) -> None:
    with pytest.raises(SequenceHashError, match=where) as caught:
        token_blocks(tokens, 4)
    assert isinstance(caught.value, KvbmError)


def test_bad_block_sizes_and_hashes_are_errors() -> None:
    with pytest.raises(SequenceHashError, match="block_size"):
        token_blocks([1, 2], 0)
    with pytest.raises(SequenceHashError, match="64 bits"):
        TokenBlock.from_hash(2**64)
    with pytest.raises(SequenceHashError, match="integer hash"):
        chain_hash("1", 2)  # type: ignore[arg-type]


@given(tokens=st.lists(st.integers(0, 2**32 - 1), max_size=200), block_size=st.integers(1, 40))
def test_sequence_hashes_are_the_routers(tokens: list[int], block_size: int) -> None:
    assert sequence_hashes(tokens, block_size) == router_sequence_hashes(tokens, block_size)


@given(
    tokens=st.lists(st.integers(0, 2**32 - 1), min_size=8, max_size=120),
    block_size=st.integers(1, 8),
    cut=st.integers(1, 10),
)
def test_hashing_in_pieces_gives_the_same_blocks(tokens: list[int], block_size: int, cut: int) -> None:
    whole = token_blocks(tokens, block_size)
    split = min(cut, len(whole)) * block_size
    head = token_blocks(tokens[:split], block_size)
    assert head + token_blocks(tokens[split:], block_size, parent=head[-1] if head else None) == whole


@given(
    a=st.lists(st.integers(0, 2**32 - 1), min_size=4, max_size=40),
    b=st.lists(st.integers(0, 2**32 - 1), min_size=4, max_size=40),
)
def test_two_sequences_share_a_hash_exactly_while_they_share_the_prefix(a: list[int], b: list[int]) -> None:
    ha, hb = sequence_hashes(a, 4), sequence_hashes(b, 4)
    for i in range(min(len(ha), len(hb))):
        assert (ha[i] == hb[i]) == (a[: 4 * (i + 1)] == b[: 4 * (i + 1)])


def test_importing_the_library_does_not_import_xxhash_and_blocks_need_no_gpu_stack() -> None:
    probe = (
        "import sys, kvbm_builder; assert 'xxhash' not in sys.modules, 'xxhash'; "
        "import kvbm_builder.blocks; "
        "assert not [m for m in sys.modules if m.split('.')[0] in ('cupy', 'nixl', 'numpy', 'torch')]"
    )
    subprocess.run([sys.executable, "-c", probe], check=True)
