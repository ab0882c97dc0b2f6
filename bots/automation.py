"""Runs automated seats (bots, synthetic humans) through the same services as people.

The game code calls two functions only: :func:`bot_controller` when it seats a bot, and
:func:`schedule_seats` when a phase opens. Everything else happens in the ``seat_act`` job.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from bots.policy import Policy
from bots.scripted import ScriptedBot
from bots.synthetic import SyntheticHuman
from experiment import actions, game
from experiment.game import RuleError
from experiment.models import Event, Group, Participant
from experiment.scheduling import schedule

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


def schedule_seats(*, group: Group, params: game.Params, pending: list[Participant], now: datetime) -> None:
    """Schedule one ``seat_act`` (``llm_decide`` for LLM seats) job per automated seat that owes an action.
    Call holding the group lock."""
    duration = params.durations[game.Phase(group.phase)]
    for p in {p.pk: p for p in pending if p.is_automated}.values():
        if p.controller == P.Controller.LLM:
            # The model is asked at once, in a worker; bots.decisions releases its answer after a human-like delay.
            schedule("llm_decide", participant_id=p.pk, round_number=group.round_number, phase=group.phase)
            continue
        delay = policy_for(p).delay(group.phase, duration, _rng(p, group, "delay"))
        at = min(now + timedelta(seconds=delay), group.phase_deadline - timedelta(seconds=0.2))
        schedule("seat_act", at=at, participant_id=p.pk, round_number=group.round_number, phase=group.phase)


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

