"""Channel layer: client CPU per broadcast, list-based RedisChannelLayer against RedisPubSubChannelLayer.

Every accepted action broadcasts about three messages: the actor's view to their seat, the progress to the
group (5 connections in the default design) and a "changed" notice to the session's monitors (often nobody).
This measures the second and third in one process, as a web process sends and receives them: ``--groups``
channel groups of ``--members`` connections each, ``--sends`` group sends round-robin over them, each followed
by one send to a group with no members, until every member has received every message.

    .venv/bin/python bench/layer.py                 # both layers, Redis at 127.0.0.1:6379, database 12
    .venv/bin/python bench/layer.py --layer pubsub --sends 5000

It uses a Redis database of its own (``--redis-db``, flushed before and after) and only 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

LAYERS = {"core": "channels_redis.core.RedisChannelLayer", "pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer"}
PROGRESS = {"type": "seat.forward", "event": {"type": "progress", "version": 3, "round": 1, "phase": "pitch", "done": 2, "of": 4}}
MONITOR = {"type": "monitor.changed", "group_id": 5}


async def measure(kind: str, *, url: str, sends: int, groups: int, members: int) -> dict[str, Any]:
    from django.utils.module_loading import import_string

    layer = import_string(LAYERS[kind])(hosts=[{"address": url}], prefix=f"bench-{kind}")
    channels = {g: [await layer.new_channel() for _ in range(members)] for g in range(groups)}
    for g, names in channels.items():
        for name in names:
            await layer.group_add(f"group-{g}", name)
    each = sends // groups

    async def drain(name: str) -> int:
        for _ in range(each):
            await layer.receive(name)
        return each

    readers = [asyncio.create_task(drain(name)) for names in channels.values() for name in names]
    await asyncio.sleep(0.2)  # every reader waiting before the clock starts
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(each * groups):
        await layer.group_send(f"group-{i % groups}", PROGRESS)
        await layer.group_send("monitor-nobody", MONITOR)
    delivered = sum(await asyncio.wait_for(asyncio.gather(*readers), 120))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await layer.flush()
    return {"layer": kind, "sends": each * groups, "delivered": delivered, "cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
            "cpu_ms_per_send": round(1000 * cpu / (each * groups), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", choices=[*LAYERS, "both"], default="both")
    parser.add_argument("--sends", type=int, default=2000)
    parser.add_argument("--groups", type=int, default=20)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--redis-db", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    import django
    import redis
    from django.conf import settings

    settings.configure()
    django.setup()
    url = f"redis://127.0.0.1:6379/{args.redis_db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        for _ in range(args.repeat):
            for kind in LAYERS if args.layer == "both" else [args.layer]:
                r = asyncio.run(measure(kind, url=url, sends=args.sends, groups=args.groups, members=args.members))
                print(f"{r['layer']:7} {r['sends']} group sends to {args.members} members (+ as many to an empty group): "
                      f"delivered {r['delivered']}, CPU {r['cpu_s']} s, wall {r['wall_s']} s, "
                      f"{r['cpu_ms_per_send']} ms CPU per send", flush=True)
    finally:
        client.flushdb()
        client.close()


if __name__ == "__main__":
    main()
