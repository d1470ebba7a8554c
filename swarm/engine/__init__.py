"""The only package that talks to llama.cpp: load a shard, run sessions through it, move KV state.

Everything handed to llama.cpp is checked here first: shapes, dtypes, token ids, positions, context
capacity and KV blobs. Bad input raises a SwarmError and never reaches C.

One job per module:

* `backend`: loading llama.cpp (only ever through `_llama`), the one thread that runs its graphs,
  and the threads each graph gets (`plan_threads`, `default_threads`).
* `tokenizer`: `Tokenizer`, the model's own tokenizer and chat template.
* `shard`: `Shard`, one loaded shard: sessions, forward steps, rollback, replay, KV export and import.
* `kvblob`: the envelope of an exported KV state (`kv_header`, `join_kv`, `KVBase`).
* `capture` (with `capture.c`): the graph callback that takes a non-final shard's output.
"""

from .backend import default_threads, plan_threads
from .kvblob import KVBase, join_kv, kv_header
from .shard import Shard
from .tokenizer import Tokenizer

__all__ = ["KVBase", "Shard", "Tokenizer", "default_threads", "join_kv", "kv_header", "plan_threads"]
