"""The `swarm` command line: the only package that prints.

    main.py     the options and the dispatch       options.py  options several commands share
    serve.py    swarm join, swarm local            talk.py     swarm generate, swarm chat
    status.py   swarm status                       cache.py    swarm cache
    model.py    swarm run, shard, info (one process, no swarm)
"""

from .main import build_parser, main
from .talk import chat_session

__all__ = ["main", "build_parser", "chat_session"]
