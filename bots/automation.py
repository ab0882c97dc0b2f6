"""Runs automated seats (bots, synthetic humans) through the same services as people.

The game code calls three functions only: :func:`bot_controller` when it seats a bot, :func:`schedule_seats`
when a phase opens, and :func:`rearm` from the sweep. Everything else happens in the ``seat_act`` job.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings

from bots.policy import Policy
from bots.scripted import ScriptedBot
from bots.synthetic import SyntheticHuman
from experiment import actions, game
from experiment.game import RuleError
from experiment.models import Event, Group, Participant, Society
from experiment.scheduling import schedule, submit

logger = logging.getLogger(__name__)
P = Participant


def bot_controller(group: Group) -> str:
    """Who plays a bot seat (or a seat a bot takes over) in this group: the arm's language model when this
    process can call it (its key is set, or it needs none), else the offline scripted bot."""
    profile = group.condition.bot_profile
    return P.Controller.LLM if profile is not None and profile.ready else P.Controller.SCRIPTED


def policy_for(participant: Participant) -> Policy:
    if participant.controller == P.Controller.SYNTHETIC:
        return SyntheticHuman()
    return ScriptedBot()


def _rng(participant: Participant, group: Group, purpose: str):
    return game.rng(group.seed, purpose, participant.seat, group.round_number, group.phase)


def _act_at(p: Participant, group: Group, duration: float, since: datetime) -> datetime:
    """When a (non-LLM) seat acts: its policy's delay after ``since``, never later than just before the deadline.
    In an AI-only group at once: the delay only keeps people from telling bots by their speed, and none are there."""
    if group.society == Society.AI_ONLY:
        return since
    delay = policy_for(p).delay(group.phase, duration, _rng(p, group, "delay"))
    return min(since + timedelta(seconds=delay), group.phase_deadline - timedelta(seconds=0.2))


def _planned(p: Participant, group: Group, params: game.Params) -> datetime:
    """When :func:`schedule_seats` had this seat act: counted from the phase's opening or, after a staff pause, from
    the time the phase's clock restarted from."""
    duration = params.durations[game.Phase(group.phase)]
    return _act_at(p, group, duration, max(group.phase_started_at, group.phase_deadline - timedelta(seconds=duration)))


def schedule_seats(*, group: Group, params: game.Params, pending: list[Participant], now: datetime) -> None:
    """Schedule one ``seat_act`` (``llm_decide`` for LLM seats) job per automated seat that owes an action.
    Call holding the group lock."""
    duration = params.durations[game.Phase(group.phase)]
    for p in {p.pk: p for p in pending if p.is_automated}.values():
        if p.controller == P.Controller.LLM:
            # The model is asked at once, in a worker; bots.decisions releases its answer after a human-like delay.
            schedule("llm_decide", participant_id=p.pk, round_number=group.round_number, phase=group.phase)
            continue
        schedule("seat_act", at=_act_at(p, group, duration, now), participant_id=p.pk, round_number=group.round_number,
                 phase=group.phase)


def seat_act(*, participant_id: int, round_number: int, phase: str) -> None:
    """Let an automated seat act, if it still owes this action. Idempotent."""
    from experiment.selectors import seat_state

    p = Participant.objects.select_related("group").get(pk=participant_id)
    if not p.is_automated or p.group is None:
        return
    state = seat_state(participant_id, for_controller=True)
    g = state.get("game")
    if not g or (g["round"], g["phase"]) != (round_number, phase) or not g["todo"]:
        return
    for message in policy_for(p).decide(state, _rng(p, p.group, "decide")):
        try:
            actions.dispatch(participant_id, message, automated=True)
        except RuleError as exc:
            Event.objects.create(session_id=p.session_id, group=p.group, participant=p, type="automation.rejected",
                                 round_number=round_number, phase=phase,
                                 payload={"code": exc.code, "message": exc.message, "action": message})
            logger.info("automated seat %s: %s", participant_id, exc.message)


# ---- jobs that were lost ---------------------------------------------------------------------------------

_last_rearm = 0.0  # monotonic time of this process's last look (the sweep runs every second; the look costs queries)


def rearm(now: datetime, *, force: bool = False) -> int:
    """Hand out again the jobs of automated seats that still owe an action in a running phase but that nobody works
    on: their job was lost. Redis restarted without persistence empties the broker's queues, a task's retry cannot be
    published while the broker is down, an embedded process that restarts forgets its timers. Without this, such a
    seat waits for the deadline and its default: a bot turn lost to the study.

    A job counts as lost once it is ``PARTNERLAB_REARM_AFTER_SECONDS`` overdue: a seat's planned time (non-LLM seats),
    the phase's opening with no turn claimed (LLM seats), a claim whose lease ran out, or a release time passed. Every
    job checks again that its seat still owes the action, so a job handed out twice acts once. Runs at most every
    ``PARTNERLAB_REARM_EVERY_SECONDS`` per process unless ``force``. Returns how many jobs were handed out."""
    global _last_rearm
    from bots.models import BotDecision
    from experiment import services

    every = settings.PARTNERLAB_REARM_EVERY_SECONDS
    if not force and time.monotonic() - _last_rearm < every:
        return 0
    _last_rearm = time.monotonic()
    late = timedelta(seconds=settings.PARTNERLAB_REARM_AFTER_SECONDS)
    groups = (Group.objects.filter(status=Group.Status.PLAYING, paused_at__isnull=True, phase_started_at__lte=now - late,
                                   phase_deadline__gt=now + timedelta(seconds=1))
              .filter(participants__controller__in=[P.Controller.LLM, P.Controller.SCRIPTED, P.Controller.SYNTHETIC])
              .select_related("session__experiment").distinct())
    handed = 0
    for group in groups:
        params = group.session.experiment.params()
        owed = [p for p in services.pending_seats(group, params) if p.is_automated]
        turns = {d.participant_id: d for d in BotDecision.objects.filter(
            participant__in=[p for p in owed if p.controller == P.Controller.LLM],
            round_number=group.round_number, phase=group.phase)}
        for p in owed:
            job = _lost_job(p, group, params, turns.get(p.pk), now - late)
            if job is not None:
                name, kwargs = job
                logger.warning("seat %s: its %s job for round %s %s was lost; handed out again", p.pk, name,
                               group.round_number, group.phase)
                submit(name, **kwargs)  # nothing was written: no transaction to wait for
                handed += 1
    return handed


REHAND_STEPS = (0.0, 5.0, 15.0)  # seconds past the first overdue moment: the first look, then doubling ...
REHAND_EVERY_AFTER = 20.0  # ... then every 20 s


def _rehand_due(overdue: float) -> bool:
    """Whether an unclaimed LLM turn, ``overdue`` s past its first overdue moment, is due to be handed out again
    now: in the first ``PARTNERLAB_REARM_EVERY_SECONDS`` after each step (0, 5, 15, then every 20 s), which the
    looks, at most that far apart, each meet. A queued job is then copied at most 4 times in a 60 s phase, where
    a copy per look (every 5 s) let a backlog of 500 turns grow to 38,000 queued jobs in a 200-group benchmark."""
    if overdue < 0:
        return False
    last = REHAND_STEPS[-1]
    if overdue >= last:
        step = last + (overdue - last) // REHAND_EVERY_AFTER * REHAND_EVERY_AFTER
    else:
        step = max(s for s in REHAND_STEPS if s <= overdue)
    return overdue - step < settings.PARTNERLAB_REARM_EVERY_SECONDS


def _lost_job(p: Participant, group: Group, params: game.Params, turn: Any, overdue_since: datetime
              ) -> tuple[str, dict[str, Any]] | None:
    """The job a seat that owes an action should have had running by ``overdue_since``, if nothing shows that it has."""
    from bots.models import BotDecision

    act = {"participant_id": p.pk, "round_number": group.round_number, "phase": group.phase}
    if p.controller != P.Controller.LLM:
        return ("seat_act", act) if _planned(p, group, params) <= overdue_since else None
    if turn is None:
        # The phase opened long enough ago and the turn was never claimed: lost, or still queued behind a backlog of
        # turns. Handed out again only at widening ages, so that a backlog is not multiplied by a copy per look.
        age = (overdue_since - group.phase_started_at).total_seconds() if group.phase_started_at else 0.0
        return ("llm_decide", act) if _rehand_due(age) else None
    if turn.status == BotDecision.Status.DECIDING and (turn.lease_until is None or turn.lease_until <= overdue_since):
        return "llm_decide", act  # claimed, then left: its retry or its redelivery never came
    if turn.status == BotDecision.Status.DECIDED and turn.apply_at is not None and turn.apply_at <= overdue_since:
        return "llm_apply", {"decision_id": turn.pk}
    return None
