"""AI-only societies: sessions whose groups have a bot in every seat, run without any browser.

The groups are seated by :func:`experiment.services.society_start` and then play through the same services,
rules, deadlines and jobs as a hybrid group: the bots' jobs go to Celery in production, or to the in-process
runner on the embedded default. This module only starts them and waits: :func:`run` is what
``manage.py society`` does, :func:`summary` what it prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from asgiref.sync import sync_to_async
from django.apps import apps
from django.conf import settings
from django.db.models import Count

from experiment import services
from experiment.game import Phase, RuleError
from experiment.models import Belief, Choice, Event, Experiment, Group, Message, Return, Session


class SocietyError(RuntimeError):
    """Something a researcher must fix before the society can run (said in words)."""


@dataclass(frozen=True)
class Run:
    session_id: int
    group_ids: list[int]
    finished: bool
    seconds: float


def longest_game_seconds(experiment: Experiment) -> float:
    """The longest a group of this design can take if every phase runs to its deadline."""
    params = experiment.params()
    per_round = sum(seconds for phase, seconds in params.durations.items() if phase != Phase.BELIEF)
    return per_round * params.n_rounds + params.durations[Phase.BELIEF] * len(params.belief_rounds)


def create_session(*, experiment: Experiment, seed: int, label: str = "") -> Session:
    """A session nobody can join (recruitment closed): its groups are started by staff."""
    return Session.objects.create(experiment=experiment, seed=seed, status=Session.Status.CLOSED, capacity=1,
                                  label=label or f"AI-only society, seed {seed}")


def start(*, session: Session, groups: int, condition: str | None = None, actor_id: int | None = None) -> list[int]:
    """Start ``groups`` AI-only groups, in calls of at most ``services.MAX_SOCIETY_GROUPS`` (each its own
    transaction, so the first groups play while the next are seated)."""
    ids: list[int] = []
    while len(ids) < groups:
        n = min(services.MAX_SOCIETY_GROUPS, groups - len(ids))
        ids += services.society_start(session_id=session.pk, groups=n, condition=condition, actor_id=actor_id)
    return ids


def _playing(group_ids: list[int]) -> int:
    return Group.objects.filter(pk__in=group_ids, status=Group.Status.PLAYING).count()


def wait(group_ids: list[int], *, time_limit: float, progress: Callable[[str], None] | None = None,
         poll: float = 0.5) -> bool:
    """Wait until every group has finished (True) or ``time_limit`` seconds have passed (False).

    On the embedded default the jobs run here, in this process's in-process runner (nothing else would run
    them); with Celery they run in the workers and beat, and this only watches the database."""
    if settings.PARTNERLAB_SCHEDULER == "inprocess":
        return asyncio.run(_wait_running_jobs(group_ids, time_limit=time_limit, progress=progress, poll=poll))
    end = time.monotonic() + time_limit
    last = None
    while (left := _playing(group_ids)) and time.monotonic() < end:
        if progress is not None and left != last:
            progress(f"{left} of {len(group_ids)} groups playing")
        last = left
        time.sleep(poll)
    return _playing(group_ids) == 0


async def _wait_running_jobs(group_ids: list[int], *, time_limit: float, progress: Callable[[str], None] | None,
                             poll: float) -> bool:
    from experiment.scheduling import runner

    task = asyncio.create_task(runner.run())
    end = time.monotonic() + time_limit
    last = None
    try:
        while (left := await sync_to_async(_playing)(group_ids)) and time.monotonic() < end:
            if progress is not None and left != last:
                progress(f"{left} of {len(group_ids)} groups playing")
            last = left
            await asyncio.sleep(poll)
        return await sync_to_async(_playing)(group_ids) == 0
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def run(*, experiment: Experiment, groups: int, seed: int, condition: str | None = None, session: Session | None = None,
        time_limit: float | None = None, wait_for_end: bool = True,
        progress: Callable[[str], None] | None = None) -> Run:
    """Create (or reuse) a session, start the AI-only groups and, unless told not to, wait for their end."""
    if session is None:
        session = create_session(experiment=experiment, seed=seed)
    elif session.experiment_id != experiment.pk:
        raise SocietyError(f"Session {session.pk} belongs to experiment {session.experiment.slug!r}, not {experiment.slug!r}.")
    began = time.monotonic()
    try:
        ids = start(session=session, groups=groups, condition=condition)
    except RuleError as exc:
        raise SocietyError(exc.message) from None
    if progress is not None:
        progress(f"session {session.pk}: {len(ids)} AI-only groups started")
    limit = time_limit if time_limit is not None else longest_game_seconds(experiment) * 1.2 + 60
    finished = wait(ids, time_limit=limit, progress=progress) if wait_for_end else False
    return Run(session_id=session.pk, group_ids=ids, finished=finished, seconds=round(time.monotonic() - began, 3))


def summary(run: Run) -> dict[str, Any]:
    """What the run stored, counted from the database: the figures a lab checks before it trusts the data."""
    session = Session.objects.select_related("experiment").get(pk=run.session_id)
    groups = Group.objects.filter(pk__in=run.group_ids)
    by_status = Counter(dict(groups.values_list("status").annotate(n=Count("id"))))
    by_condition = dict(groups.values_list("condition__name").annotate(n=Count("id")))
    stored = {
        "messages": Message.objects.filter(group__in=groups).count(),
        "choices": Choice.objects.filter(group__in=groups).count(),
        "returns": Return.objects.filter(choice__group__in=groups).count(),
        "beliefs": Belief.objects.filter(group__in=groups).count(),
        "timed_out_pitches": Message.objects.filter(group__in=groups, timed_out=True).count(),
        "timed_out_choices": Choice.objects.filter(group__in=groups, timed_out=True).count(),
        "timed_out_returns": Return.objects.filter(choice__group__in=groups, timed_out=True).count(),
    }
    events = Counter(dict(Event.objects.filter(session=session).values_list("type").annotate(n=Count("id"))))
    out: dict[str, Any] = {
        "experiment": session.experiment.slug, "session": session.pk, "seed": session.seed,
        "groups": len(run.group_ids), "groups_finished": by_status.get(Group.Status.FINISHED, 0),
        "groups_playing": by_status.get(Group.Status.PLAYING, 0), "groups_by_condition": by_condition,
        "duration_s": run.seconds, "stored": stored,
        "defaults_applied": events.get("default.applied", 0), "automation_rejected": events.get("automation.rejected", 0),
    }
    decision = apps.get_model("bots", "BotDecision") if apps.is_installed("bots") else None
    if decision is not None:  # read by name: this app does not import the bots app
        out["bot_turns"] = dict(decision.objects.filter(group__in=groups).values_list("status").annotate(n=Count("id")))
        call = apps.get_model("bots", "LLMCall")
        out["llm_calls"] = dict(call.objects.filter(group__in=groups).values_list("status").annotate(n=Count("id")))
    return out
