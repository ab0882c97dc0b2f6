"""CPU and queries of the two things a web process does most: an action and a seat's view.

bench/load.py answers "does the machine hold 1,000 people"; its runs take 9 minutes and vary with the
machine. This answers "what does one action cost" in seconds and repeatably, so that a change to the hot
paths can be judged before a load run: it plays whole games of the default design in one process through
the same calls the websocket consumer makes (``actions.dispatch`` for an action, ``seat_state`` for a
view), with the synthetic humans of ``bots.synthetic`` deciding from their views, and after every action
takes the views a real server would send: the actor's own and, at a phase change, every person's, which
the call that acted builds and sends (``seat.states``), so that their cost is in that call's ("action,
new phase" when an action closed the phase); views that nobody sent are read as a connection would.
Counting queries records each one (Django's query log), which adds a little CPU to every call: compare
figures of this tool with each other, not with a server's.

Usage: .venv/bin/python bench/hotpath.py [--groups 20] [--profile out.txt]
Drops and recreates partnerlab_hotpath_bench on 127.0.0.1's PostgreSQL; the channel layer is Redis db 12.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.monitor import _drop, _recreate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=20)
    parser.add_argument("--database-url", default="postgres://postgres@127.0.0.1:5432/partnerlab_hotpath_bench")
    parser.add_argument("--profile", help="Write a cProfile summary (by cumulative time) of the timed part here.")
    args = parser.parse_args()
    if not args.database_url.startswith("postgres://postgres@127.0.0.1:"):
        parser.error("--database-url must point at 127.0.0.1")
    _recreate(args.database_url)
    os.environ.update({
        "DJANGO_SETTINGS_MODULE": "config.settings.production", "DJANGO_SECRET_KEY": "bench-only-" + "x" * 50,
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1", "DATABASE_URL": args.database_url, "REDIS_URL": "redis://127.0.0.1:6379/12",
    })
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    settings.PARTNERLAB_SCHEDULER = "inprocess"  # jobs queue up; the loop below runs the bots' at once
    # The game page names its script through the static files storage; production's reads the manifest that
    # collectstatic writes, which a bench checkout does not have (a dictionary lookup either way).
    settings.STORAGES = {**settings.STORAGES,
                         "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}}
    try:
        call_command("migrate", verbosity=0)
        _run(args.groups, args.profile)
    finally:
        from django.db import connections

        connections.close_all()
        _drop(args.database_url)


class Meter:
    """CPU seconds and queries of every call, by kind of call."""

    def __init__(self) -> None:
        self.calls: dict[str, list[tuple[float, int]]] = defaultdict(list)

    def call(self, kind: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from django.db import connection
        from django.test.utils import CaptureQueriesContext

        with CaptureQueriesContext(connection) as captured:
            start = time.thread_time()
            result = fn(*args, **kwargs)
            cpu = time.thread_time() - start
        self.calls[kind].append((cpu, len(captured)))
        return result

    def rename_last(self, kind: str, new: str) -> None:
        """Count the last call of ``kind`` as one of ``new`` (known only once the call has returned)."""
        self.calls[new].append(self.calls[kind].pop())

    def lines(self) -> list[str]:
        out = []
        for kind, calls in sorted(self.calls.items()):
            if not calls:
                continue
            times = sorted(cpu for cpu, _ in calls)
            n = len(times)
            queries = sum(q for _, q in calls)
            out.append(f"{kind:<40} n={n:<6} CPU mean {sum(times) / n * 1000:6.2f} ms   p50 {times[n // 2] * 1000:6.2f} ms   "
                       f"p95 {times[int(n * 0.95)] * 1000:6.2f} ms   queries/call {queries / n:5.1f}")
        return out


def _arrive(meter: Meter, session: Any, i: int) -> int:
    """One person arrives from Prolific as a browser does: the join link, its redirect to the game page, the
    websocket's accept (its token looked up and its connection counted, as the consumer does). Returns their id.

    The HTTP calls go through Django's whole request handling (middleware, view, template) in this thread, not
    through an ASGI server. The connection is closed again at once (not timed), so that no sweep of a long run
    finds it stale."""
    from django.test import Client

    from experiment import consumers, services

    browser = Client(HTTP_HOST="127.0.0.1")  # a browser of its own: its own cookies
    recruitment = {"PROLIFIC_PID": f"bench{i:06d}", "STUDY_ID": "hotpath", "SESSION_ID": f"s{i:06d}"}
    joined = meter.call("arrival: join link (HTTP)", browser.get, f"/join/{session.code}/", recruitment, secure=True)
    assert joined.status_code == 302, joined.status_code
    page = meter.call("arrival: game page (HTTP)", browser.get, joined["Location"], secure=True)
    assert page.status_code == 200, page.status_code
    token = joined["Location"].rstrip("/").rsplit("/", 1)[1]

    def accept() -> tuple[int, int]:
        found = consumers._participant_by_token.func(token)  # (the function the consumer runs in a pool thread)
        connection_id = services.connection_open(participant_id=found[0], process="hotpath-bench")
        return found[0], connection_id

    pid, connection_id = meter.call("arrival: websocket accept", accept)
    services.connection_close(connection_id=connection_id, participant_id=pid)
    return pid


def _run(n_groups: int, profile: str | None) -> None:
    import cProfile
    import pstats

    from django.utils import timezone

    from bots import automation
    from bots.synthetic import SyntheticHuman
    from experiment import actions, events, services
    from experiment.models import Condition, Experiment, Group, Participant, Session
    from experiment.scheduling import runner
    from experiment.selectors import seat_state

    P = Participant
    experiment = Experiment.objects.create(name="Hot path bench", slug="hotpath-bench", n_rounds=3)
    Condition.objects.create(experiment=experiment, name="hidden")
    Condition.objects.create(experiment=experiment, name="disclosed", disclose_identity=True)
    session = Session.objects.create(experiment=experiment, capacity=n_groups * experiment.n_humans)
    human = SyntheticHuman(quiz_key={str(i): q["answer"] for i, q in enumerate(experiment.quiz)})
    rng = random.Random(1)
    meter = Meter()
    people = [_arrive(meter, session, i) for i in range(n_groups * experiment.n_humans)]

    states: dict[int, dict[str, Any]] = {pid: meter.call("view on connect", seat_state, pid) for pid in people}
    known: dict[int, tuple[Any, ...]] = {}  # group → (status, round, phase) its people last saw
    sent: list[tuple[str, dict[str, Any]]] = []  # the views built by the last call, as the server sends them
    send = events._send_now

    def sending(channel_group: str, message: dict[str, Any]) -> None:
        if message["type"] == "seat.states":
            sent.append((channel_group, message))
        send(channel_group, message)

    events._send_now = sending

    def phase_views(group_ids: Any) -> set[int]:
        """The views a server sends when a group's phase changed: every person's, as the call that changed it
        sent them, or read one by one where that call did not (the group's first phase). Returns who got one."""
        seen = set()
        for _, message in sent:
            for pid, state in message["states"].items():
                states[int(pid)] = state
                seen.add(int(pid))
        sent.clear()
        for g in Group.objects.filter(pk__in=list(group_ids)):
            key = (g.status, g.round_number, g.phase)
            if known.get(g.pk) != key:
                known[g.pk] = key
                for pid in g.participants.filter(controller=P.Controller.PERSON).values_list("pk", flat=True):
                    if pid not in seen:
                        states[pid] = meter.call("phase view", seat_state, pid)
                        seen.add(pid)
        return seen

    def act(pid: int) -> bool:
        """The person acts on their last view if it asks something of them; True when they did."""
        messages = human.decide(states[pid], rng)
        for message in messages:
            kind = f"action {message['type']}"
            meter.call(kind, actions.dispatch, pid, message)
            if any(channel.startswith("group-") for channel, _ in sent):
                meter.rename_last(kind, f"{kind}, new phase")
            group_id = Participant.objects.values_list("group_id", flat=True).get(pk=pid)
            if pid not in phase_views([group_id] if group_id else []):
                states[pid] = meter.call("view after action", seat_state, pid)
        return bool(messages)

    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    began = time.perf_counter()
    while True:
        busy = False
        for pid in people:
            busy |= act(pid)
        for name, kwargs in runner._pop_due(float("inf")):
            if name == "seat_act":
                meter.call("bot (Celery)", automation.seat_act, **kwargs)
                phase_views(Participant.objects.filter(pk=kwargs["participant_id"]).values_list("group_id", flat=True))
                busy = True
        if not busy:
            playing = Group.objects.filter(session=session, status=Group.Status.PLAYING)
            if not playing.exists():
                break
            # Nobody owes anything (feedback, or waiting out a phase): let the deadline pass.
            ids = list(playing.values_list("pk", flat=True))
            playing.update(phase_deadline=timezone.now() - timezone.timedelta(seconds=1))
            meter.call("deadline sweep", services.sweep)
            phase_views(ids)
    took = time.perf_counter() - began
    if profiler:
        profiler.disable()
        with open(profile, "w") as out:
            pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(80)
    finished = Group.objects.filter(session=session, status=Group.Status.FINISHED).count()
    print(f"{n_groups} groups of {experiment.n_humans} people, {experiment.n_rounds} rounds: {finished} finished "
          f"in {took:.1f} s")
    print("\n".join(meter.lines()))


if __name__ == "__main__":
    main()
