"""Tiered LMDB page store (host RAM, then SSD): see storage/store.py and docs/STORAGE.md."""

from .env import NoRoom, StoreError
from .keys import namespace, store_key
from .store import TieredStore, chain_parents

__all__ = ["NoRoom", "StoreError", "TieredStore", "chain_parents", "namespace", "store_key"]
