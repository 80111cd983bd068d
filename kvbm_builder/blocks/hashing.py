"""Sequence hashes of token blocks, computed as Dynamo's KV router computes them.

A block's *local hash* is xxh3_64 (seed 1337) over its token ids as little-endian u32; its *sequence hash* is the
local hash for the first block of a sequence and otherwise xxh3_64 (seed 1337) over the 16 bytes
``[parent sequence hash as LE u64, local hash as LE u64]``. So a sequence hash names a block *and everything before
it*: two requests share a block's sequence hash exactly when they share the whole prefix up to it. This is
upstream's ``compute_block_hash_for_seq`` / ``compute_seq_hash_for_block`` (``lib/kv-router/src/protocols.rs`` in
ai-dynamo/dynamo), so the hashes here agree with the router's view of which worker holds which prefix.

Only full blocks are hashed: a partial tail has no hash until it fills.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import attrs
import xxhash

from ..errors import SequenceHashError

__all__ = [
    "XXH3_SEED",
    "TokenBlock",
    "chain_hash",
    "local_block_hash",
    "sequence_hashes",
    "token_blocks",
]

XXH3_SEED = 1337
"""The seed of every hash here (upstream's ``XXH3_SEED``)."""

_U64 = 1 << 64
_PAIR = struct.Struct("<QQ")


def _u64(value: object, what: str) -> int:
    """A 64-bit hash as an unsigned int: engines that send signed 64-bit hashes get them reinterpreted bitwise."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise SequenceHashError(f"{what} must be an integer hash, got {value!r} ({type(value).__name__})")
    number = int(value)
    if not -(1 << 63) <= number < _U64:
        raise SequenceHashError(f"{what} must fit in 64 bits (signed or unsigned), got {number}")
    return number % _U64


def _pack_tokens(tokens: Sequence[int], what: str = "tokens") -> bytes:
    try:
        return struct.pack(f"<{len(tokens)}I", *tokens)
    except (struct.error, TypeError):
        for index, token in enumerate(tokens):
            if isinstance(token, bool) or not hasattr(token, "__index__") or not 0 <= int(token) < 1 << 32:
                raise SequenceHashError(
                    f"{what}[{index}] = {token!r} is not a token id (an integer 0..2**32-1)"
                ) from None
        raise


def local_block_hash(tokens: Sequence[int]) -> int:
    """xxh3_64 (seed 1337) of one block's token ids as little-endian u32 (upstream's ``LocalBlockHash``)."""
    return xxhash.xxh3_64_intdigest(_pack_tokens(tokens), seed=XXH3_SEED)


def chain_hash(parent_hash: int | None, local_hash: int) -> int:
    """The sequence hash of a block whose parent block has ``parent_hash`` (None: the first block of a sequence)."""
    local = _u64(local_hash, "local_hash")
    if parent_hash is None:
        return local
    return xxhash.xxh3_64_intdigest(_PAIR.pack(_u64(parent_hash, "parent_hash"), local), seed=XXH3_SEED)


@attrs.frozen
class TokenBlock:
    """What identifies the contents of one full block: the key a pool registers it under, and what events carry.

    - ``sequence_hash``: the registry key (from the tokens and the parent, or an engine's own hash);
    - ``parent_hash``: the sequence hash of the block before it (None for the first block);
    - ``tokens``: the block's token ids (empty when an engine identified the block by hash only);
    - ``local_hash``: the hash of the tokens alone (None when not computed from tokens);
    - ``external_hash``: an engine's own hash for the block (e.g. vLLM's), carried along for its events.

    Make one with :meth:`from_tokens`, :meth:`from_hash` or :func:`token_blocks`.
    """

    sequence_hash: int
    parent_hash: int | None = None
    tokens: tuple[int, ...] = ()
    local_hash: int | None = None
    external_hash: int | None = None

    @classmethod
    def from_tokens(
        cls, tokens: Sequence[int], parent: TokenBlock | int | None = None, *, external_hash: int | None = None
    ) -> TokenBlock:
        """The block of ``tokens`` after ``parent`` (a TokenBlock, its sequence hash, or None for the first)."""
        parent_hash = parent.sequence_hash if isinstance(parent, TokenBlock) else parent
        if parent_hash is not None:
            parent_hash = _u64(parent_hash, "parent")
        local = local_block_hash(tokens)
        return cls(
            sequence_hash=chain_hash(parent_hash, local),
            parent_hash=parent_hash,
            tokens=tuple(int(t) for t in tokens),
            local_hash=local,
            external_hash=None if external_hash is None else _u64(external_hash, "external_hash"),
        )

    @classmethod
    def from_hash(cls, sequence_hash: int, *, parent_hash: int | None = None, tokens: Sequence[int] = ()) -> TokenBlock:
        """A block an engine already identified by its own hash, registered under that hash as is.

        ``tokens`` (optional) are carried to events; they are checked to be token ids but not hashed. Signed 64-bit
        hashes are reinterpreted as unsigned (bitwise), as upstream does.
        """
        key = _u64(sequence_hash, "sequence_hash")
        if tokens:
            _pack_tokens(tokens)
        return cls(
            sequence_hash=key,
            parent_hash=None if parent_hash is None else _u64(parent_hash, "parent_hash"),
            tokens=tuple(int(t) for t in tokens),
            external_hash=key,
        )


def token_blocks(
    tokens: Sequence[int],
    block_size: int,
    *,
    parent: TokenBlock | int | None = None,
    external_hashes: Sequence[int] | None = None,
) -> list[TokenBlock]:
    """Cut ``tokens`` into full blocks of ``block_size`` and hash them, chained from ``parent``.

    A partial tail (``len(tokens) % block_size`` tokens) is left out: it has no hash until it fills.
    ``external_hashes``, when given, holds an engine's own hash for each full block, carried in the blocks.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise SequenceHashError(f"block_size must be a whole number >= 1, got {block_size!r}")
    count = len(tokens) // block_size
    if external_hashes is not None and len(external_hashes) != count:
        raise SequenceHashError(
            f"external_hashes has {len(external_hashes)} hashes but the tokens make {count} full blocks of "
            f"{block_size}; give one hash per full block"
        )
    data = memoryview(_pack_tokens(tokens[: count * block_size]))
    parent_hash = parent.sequence_hash if isinstance(parent, TokenBlock) else parent
    if parent_hash is not None:
        parent_hash = _u64(parent_hash, "parent")
    step = 4 * block_size
    blocks = []
    for index in range(count):
        local = xxhash.xxh3_64_intdigest(data[index * step : (index + 1) * step], seed=XXH3_SEED)
        sequence = (
            local if parent_hash is None else xxhash.xxh3_64_intdigest(_PAIR.pack(parent_hash, local), seed=XXH3_SEED)
        )
        start = index * block_size
        blocks.append(
            TokenBlock(
                sequence_hash=sequence,
                parent_hash=parent_hash,
                tokens=tuple(int(t) for t in tokens[start : start + block_size]),
                local_hash=local,
                external_hash=None if external_hashes is None else _u64(external_hashes[index], "external_hashes"),
            )
        )
        parent_hash = sequence
    return blocks


def sequence_hashes(tokens: Sequence[int], block_size: int, *, parent: TokenBlock | int | None = None) -> list[int]:
    """The sequence hash of every full block of ``tokens`` (what the router indexes), chained from ``parent``."""
    return [block.sequence_hash for block in token_blocks(tokens, block_size, parent=parent)]
