"""Blocks of a tier: sequence hashes, pools, events and offload filters.

- :func:`token_blocks` / :func:`sequence_hashes` cut tokens into full blocks and hash them as Dynamo's router does;
- :class:`BlockPool` keeps one tier's slots (free, active, inactive) and its registry of sequence hashes;
  :class:`SlotGroup` / :class:`BlockGroup` handle many of its blocks as one (batch operations, one lock each);
- :class:`StoreEvent` / :class:`RemoveEvent` are what pools send to the config's ``event_manager``;
- :class:`FrequencyFilter` is upstream's offload filter (a block must be seen twice before it goes to disk).
"""

from .events import BlockEvent, NullEventManager, RemoveEvent, RemoveReason, StoreEvent
from .filters import FrequencyFilter
from .hashing import XXH3_SEED, TokenBlock, chain_hash, local_block_hash, sequence_hashes, token_blocks
from .pool import BlockGroup, BlockPool, ImmutableBlock, MutableBlock, PoolCounts, SlotGroup

__all__ = [
    "XXH3_SEED",
    "BlockEvent",
    "BlockGroup",
    "BlockPool",
    "FrequencyFilter",
    "ImmutableBlock",
    "MutableBlock",
    "NullEventManager",
    "PoolCounts",
    "RemoveEvent",
    "RemoveReason",
    "SlotGroup",
    "StoreEvent",
    "TokenBlock",
    "chain_hash",
    "local_block_hash",
    "sequence_hashes",
    "token_blocks",
]
