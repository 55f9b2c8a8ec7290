"""Paged KV cache bookkeeping: physical blocks and the per-sequence tables that map onto them."""

from .block_pool import Block, BlockHash, BlockPool, hash_block_chain, hash_block_tokens
from .kv_manager import KVCacheManager

__all__ = ["Block", "BlockHash", "BlockPool", "KVCacheManager", "hash_block_chain", "hash_block_tokens"]
