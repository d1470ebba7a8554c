"""`swarm cache`: list the shard files this machine keeps, and prune them."""

from __future__ import annotations

import argparse
import json
import time

from ..errors import BadInputError


def _cache_limit(args: argparse.Namespace) -> tuple[int | None, str]:
    """The shard cache's cap for `swarm cache`, and where it comes from."""
    import os

    from .. import shardcache

    if args.cache_limit is not None:
        return shardcache.parse_limit(args.cache_limit), "--cache-limit"
    if os.environ.get(shardcache.LIMIT_ENV, "").strip():
        return shardcache.limit_from_env_or_default(), f"${shardcache.LIMIT_ENV}"
    return shardcache.default_limit(), "default: 20 GB, or half the space the cache could take on a smaller disk"


def _age(text: str) -> float:
    """'7d', '12h', '1d12h', '90m' -> seconds."""
    import re

    from ..join import parse_duration

    days = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*d\s*(.*)", text, re.IGNORECASE)
    try:
        rest = days[2] if days else text
        seconds = (float(days[1]) * 86400 if days else 0.0) + (parse_duration(rest) if rest.strip() else 0.0)
    except BadInputError:
        seconds = -1.0
    if seconds <= 0:
        raise BadInputError(f"cannot read --older-than {text!r}; write a positive age like 7d, 12h or 1d12h")
    return seconds


def cmd_cache(args: argparse.Namespace) -> int:
    from .. import shardcache

    if args.action == "list" and (args.all or args.older_than or args.dry_run):
        raise BadInputError("--all, --older-than and --dry-run are for `swarm cache prune`")
    limit, source = _cache_limit(args)
    cap = f"a {shardcache.human(limit)} cap ({source})" if limit is not None else f"no cap ({source})"
    head = {"dir": str(shardcache.shards_dir()), "limit": limit, "limit_source": source}
    if args.action == "list":
        return _cache_list(args, head, limit, cap)
    if limit is None and not args.all and not args.older_than:
        raise BadInputError(f"the shard cache has no cap ({source}), so there is nothing to prune it down to; "
                            "use --all, --older-than AGE or --cache-limit SIZE")
    older_than = _age(args.older_than) if args.older_than else None
    result = shardcache.evict(0 if args.all else limit, older_than=older_than, dry_run=args.dry_run)
    if args.json:
        print(json.dumps({**head, "total": result.total, "dry_run": args.dry_run,
                          "removed": [_cache_record(e) for e in result.removed],
                          "in_use": [_cache_record(e) for e in result.in_use]}, indent=2))
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for e in result.removed:
        print(f"{verb} {e.name} ({shardcache.human(e.size)}, last used {_when(e.last_used)})")
    for e in result.in_use:
        print(f"kept {e.name} ({shardcache.human(e.size)}): in use by a running node")
    freed = shardcache.human(sum(e.size for e in result.removed))
    print(f"{verb} {len(result.removed)} file(s) ({freed}); {shardcache.human(result.total)} left, {cap}")
    if result.over:
        print("still over the cap: the rest is in use; stop the nodes that use it, or raise --cache-limit")
    return 0


def _cache_list(args: argparse.Namespace, head: dict, limit: int | None, cap: str) -> int:
    from .. import shardcache

    found = shardcache.entries()[::-1]  # most recently used first
    total = sum(e.size for e in found)
    records = [_cache_record(e) for e in found]
    if args.json:
        print(json.dumps({**head, "total": total, "shards": records}, indent=2))
        return 0
    print(f"shard cache {head['dir']}: {len(found)} file(s), {shardcache.human(total)} of {cap}")
    rows = [("NAME", "MODEL", "LAYERS", "SIZE", "LAST USED", "")]
    for r in records:
        layers = f"{r['layers'][0]}:{r['layers'][1]}" if r["layers"] else "?"
        layers += f" of {r['n_layer_total']}" if r["n_layer_total"] else ""
        model = f"{r['model']} ({r['arch']})" if r["model"] else r["arch"] or "?"
        state = ("downloading" if r["in_use"] else "partial download") if r["partial"] else (
            "in use" if r["in_use"] else "")
        rows.append((r["name"], model, layers, shardcache.human(r["size"]), _when(r["last_used_unix"]), state))
    if len(rows) > 1:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(c.rjust(w) if i == 3 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    if limit is not None and total > limit:
        print("over the cap: `swarm cache prune` removes the least recently used shards that no node uses")
    return 0


def _cache_record(e) -> dict:
    from ..shardcache import describe

    return {"name": e.name, "path": str(e.path), "size": e.size, "last_used_unix": e.last_used, "in_use": e.in_use,
            "partial": e.partial, **describe(e)}


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))
