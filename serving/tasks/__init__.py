"""Few-shot tasks registered at run time and the stores that share them between replicas.

    base.py       FewShotTask (the Tip-Adapter cache model), the TaskStore interface, errors, LRUCache
    directory.py  DirectoryTaskStore: memory or one directory (one machine)
    postgres.py   PostgresTaskStore: one table shared by every replica
    select.py     open_task_store(location): the registry of location schemes

Imports run one way: select -> {directory, postgres} -> base.
"""
from .base import FewShotTask, LRUCache, TaskStore, TaskStoreError, check_name, redact
from .select import STORE_SCHEMES, open_task_store, store_scheme

__all__ = ["FewShotTask", "LRUCache", "TaskStore", "TaskStoreError", "check_name", "redact", "STORE_SCHEMES",
           "open_task_store", "store_scheme"]
