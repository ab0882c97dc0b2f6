"""Language-model turns: claim the turn, ask the model outside every lock, record, decide, release later.

The life of one turn (one LLM seat, one round, one phase), in the order things happen:

1. The phase opens; ``bots.automation.schedule_seats`` schedules the ``llm_decide`` job at once.
2. :func:`claim` creates (or takes over) the seat's :class:`~bots.models.BotDecision` row, under a
   lease, and renders the seat's view into chat messages. A second copy of the job (a redelivered
   Celery task, a retry racing a redelivery) finds the row and backs off or stops: one decision per turn.
3. The model is called with no lock and no transaction open, always through the async client on the
   process's :data:`background` loop: a Celery task's thread waits for that one request; on the
   embedded default the whole turn runs on the loop, so waiting never holds a thread.
4. :func:`call_close` records the attempt as an :class:`~bots.models.LLMCall` and validates the reply
   with the game's own rules. Invalid: one corrective retry, then the profile's fallback. Failed
   request: a retry scheduled after the endpoint's ``Retry-After`` (or exponential backoff) while the
   profile's retries and the phase's time allow, then the fallback.
   Before each request (:func:`admit`): the session's spend budget for the profile (spent: no call, the phase
   default), then the profile's limits shared by all workers (``bots.limits``). A turn refused a token or a
   slot waits in place only briefly (at most :data:`INLINE_WAIT`, once per run), else it runs again when the
   limiter says (a ``RetryAt``: the Celery task retries itself with that countdown, so no worker sleeps long,
   and the web process never waits on a model at all); a wait that would end too close to the deadline
   lets the profile's fallback act instead.
5. :func:`decide` stores the decision and schedules ``llm_apply`` at the human-like release time
   (profile delay + typing time, never after the deadline). A decision made after the phase closed
   is recorded as ``late`` and not applied.
6. :func:`apply` sends the decision through ``experiment.actions.dispatch(..., automated=True)``:
   the same validation and services as a person's input; unique constraints catch any duplicate.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

from django.db import IntegrityError, OperationalError, close_old_connections, connection, transaction
from django.db.models import Exists, F, OuterRef, Q, Sum
from django.utils import timezone

from bots import limits, llm, prompts
from bots.models import BotDecision, BotProfile, LLMCall, token_cost
from bots.policy import human_like_delay
from bots.scripted import ScriptedBot
from bots.selectors import candidate_history, group_history
from experiment import events, game
from experiment.game import RuleError
from experiment.models import Event, Group, Participant, Society
from experiment.scheduling import schedule, submit

logger = logging.getLogger(__name__)
P = Participant
T = TypeVar("T")

LEASE_MARGIN = 5.0  # seconds a claim outlives its request's timeout before another worker may take over
APPLY_MARGIN = 0.3  # the latest release is this long before the deadline
MIN_RETRY_ROOM = 1.0  # no retry that would start less than this before the deadline
BACKOFF_BASE, BACKOFF_CAP = 1.0, 20.0
CLOSED_CODES = {"wrong_phase", "phase_closed", "game_over"}
SQLITE_LOCK_RETRIES = 40
# A turn refused by its profile's limits waits in place at most this long, once per run; a longer wait runs the turn
# again later (a Celery retry with a countdown), so that a worker's thread is not held sleeping.
INLINE_WAIT = 0.5
THROTTLE_SPREAD = 0.5  # later runs are spread over up to this fraction more of the wait, so they do not all return at once


@dataclass(frozen=True)
class RetryAt:
    """Run the turn's job again at ``at`` (the lease of another worker, or a backoff after a failure)."""

    at: datetime
    reason: str


@dataclass(frozen=True)
class Correct:
    """Ask again with these messages (the original ones, the invalid reply and what to fix)."""

    messages: list[dict[str, str]]


@dataclass(frozen=True)
class Plan:
    """Everything one run of a turn needs, read once at the claim."""

    decision_id: int
    participant_id: int
    session_id: int
    group_id: int
    group_seed: int
    seat: str
    round_number: int
    phase: str
    phase_started: datetime
    deadline: datetime
    state: dict[str, Any]
    profile_id: int | None
    fallback: str
    delay: tuple[float, float]
    typing_cps: float
    max_retries: int
    human_like: bool = True  # release after a human-like delay; False in AI-only groups (nobody to tell bots by speed)
    settings: llm.LLMSettings | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    response_format: dict[str, Any] | None = None
    problem: str = ""  # why the model cannot be asked at all (no profile, no key): the fallback acts
    limits: limits.Limits | None = None
    budget: Decimal | None = None  # US dollars the profile may spend in this session; None: no budget
    throttled: int = 0  # throttled waits of the turn not yet recorded with a request (LLMCall.throttled)
    prices: tuple[Decimal, Decimal] | None = None  # the profile's per 1,000 input and output tokens (US dollars)
    fresh: bool = False  # this claim created the turn: it has no call yet (its first request is attempt 1)

    def rng(self, purpose: str) -> random.Random:
        return game.rng(self.group_seed, purpose, self.seat, self.round_number, self.phase)


# ---- 2. claim -----------------------------------------------------------------------------------------

def claim(*, participant_id: int, round_number: int, phase: str) -> Plan | RetryAt | None:
    """Take the turn (or find that someone holds it, or that there is nothing left to do)."""
    from experiment.selectors import seat_state

    now = timezone.now()
    try:
        # Read before the claim's transaction, where the parts of the view that the group's seats share are read once
        # per process and kept (inside a transaction they are read again for every seat). The view was never read
        # under the group's lock: it is checked below, under the turn's, as before.
        state = seat_state(participant_id, for_controller=True)
    except Participant.DoesNotExist:
        return None
    try:
        return _claim(participant_id, round_number, phase, state, now, fresh=True)
    except IntegrityError:
        # The turn's row exists already (a retry, a redelivered or a second copy of the job): claim it as it is.
        return _claim(participant_id, round_number, phase, state, now, fresh=False)


def _claim(participant_id: int, round_number: int, phase: str, state: dict[str, Any], now: datetime, *,
           fresh: bool) -> Plan | RetryAt | None:
    """The claim in one transaction. ``fresh``: create the turn's row straight away (one INSERT, which the unique
    constraint refuses when the row exists: the caller then runs the claim again without), instead of looking for it
    first and creating it in a savepoint (four round trips, for the usual first claim)."""
    with transaction.atomic():
        # Whether the seat has any turn still deciding comes with the seat (usually none: no abandoned turn to close).
        deciding = BotDecision.objects.filter(participant=OuterRef("pk"), status=BotDecision.Status.DECIDING)
        p = (Participant.objects.select_related("group__condition__bot_profile", "session__experiment")
             .annotate(deciding=Exists(deciding))
             .filter(pk=participant_id).order_by().first())  # (the default ordering's joins cost ~0.5 ms to compile)
        group = p.group if p else None
        if p is None or group is None or p.controller != P.Controller.LLM:
            return None
        if (group.status != Group.Status.PLAYING or (group.round_number, group.phase) != (round_number, phase)
                or (group.phase_deadline is not None and now >= group.phase_deadline)):
            # The phase ended without a decision (its default applied). A turn nobody is working on is closed;
            # one still waiting for its model is left alone so that its answer is recorded as late.
            BotDecision.objects.filter(participant=p, round_number=round_number, phase=phase,
                                       status=BotDecision.Status.DECIDING).filter(
                Q(lease_until__isnull=True) | Q(lease_until__lte=now)).update(
                status=BotDecision.Status.SKIPPED, applied_at=now, lease_until=None,
                outcome={"skipped": "The phase closed before a decision was made."})
            return None
        arm_profile = group.condition.bot_profile
        if fresh:
            # The lease the claim ends with (below) is set at once: one write fewer.
            lease = now + timedelta(seconds=(arm_profile.timeout_seconds if arm_profile else 0) + LEASE_MARGIN)
            # So is the memory arm the prompt is built with (below), as the profile says now.
            arm = {"memory": arm_profile.memory, "memory_rounds": arm_profile.memory_rounds} if arm_profile else {}
            decision = BotDecision.objects.create(participant=p, round_number=round_number, phase=phase, group=group,
                                                  session_id=p.session_id, profile=arm_profile, lease_until=lease,
                                                  **arm)
            decision.profile = arm_profile  # loaded with the group: not read again
            if p.deciding:
                _close_abandoned_turns(p, keep=decision.pk, now=now)
        else:
            decision = BotDecision.objects.select_for_update(of=("self",)).select_related("profile").get(
                participant=p, round_number=round_number, phase=phase)
            if decision.status == BotDecision.Status.DECIDED:
                # The release may never have been scheduled (worker lost between commit and publish).
                schedule("llm_apply", at=decision.apply_at, decision_id=decision.pk)
                return None
            if decision.status != BotDecision.Status.DECIDING:
                return None
            if decision.lease_until is not None and decision.lease_until > now:
                return RetryAt(decision.lease_until, "busy")
            lost = decision.calls.filter(status=LLMCall.Status.PENDING).update(
                status=LLMCall.Status.ERROR, error_class="WorkerLost", finished_at=now,
                error_message="The worker stopped before the reply arrived; the redelivered task took over.")
            if lost:
                logger.info("turn %s taken over after a lost worker", decision.pk)
        g = state.get("game")
        if not g or not g.get("todo") or (g["round"], g["phase"]) != (round_number, phase):
            decision.status, decision.applied_at, decision.lease_until = BotDecision.Status.SKIPPED, now, None
            decision.save(update_fields=["status", "applied_at", "lease_until"])
            return None
        profile: BotProfile | None = decision.profile or arm_profile
        plan = Plan(
            decision_id=decision.pk, participant_id=p.pk, session_id=p.session_id, group_id=group.pk, group_seed=group.seed,
            seat=p.seat, round_number=round_number, phase=phase, phase_started=group.phase_started_at or now,
            deadline=group.phase_deadline or now + timedelta(seconds=60), state=state,
            profile_id=profile.pk if profile else None,
            fallback=profile.fallback if profile else BotProfile.Fallback.SCRIPTED,
            delay=(profile.delay_min, profile.delay_max) if profile else (4.0, 15.0),
            typing_cps=profile.typing_cps if profile else 8.0, max_retries=profile.max_retries if profile else 0,
            human_like=group.society != Society.AI_ONLY,
            limits=limits.Limits.of(profile) if profile else None,
            budget=profile.budget_per_session_usd if profile else None,
            throttled=_unrecorded_waits(decision),
            prices=(profile.price_input_per_1k, profile.price_output_per_1k) if profile else None,
            fresh=fresh,
        )
        if profile is None:
            return _with_problem(plan, decision, "This arm has no bot profile any more.")
        try:
            settings = llm.LLMSettings.from_profile(profile)
        except llm.MissingKey as exc:
            LLMCall.objects.create(**_call_fields(plan), model=profile.model, status=LLMCall.Status.ERROR,
                                   error_class="MissingKey", error_message=str(exc), finished_at=now)
            return _with_problem(plan, decision, str(exc))
        memory, window = profile.memory, profile.memory_rounds
        history = (candidate_history(participant_id=p.pk, before_round=round_number, rounds=window)
                   if p.role == P.Role.CANDIDATE and memory != BotProfile.Memory.NONE else [])
        shared = (group_history(group_id=group.pk, before_round=round_number, rounds=window)
                  if memory == BotProfile.Memory.GROUP else None)
        messages = prompts.messages_for(persona=profile.system_prompt, instructions=p.session.experiment.instructions_text,
                                        state=state, history=history, now=now, memory=memory, group_history=shared)
        name, schema = prompts.schema_for(state)
        lease = now + timedelta(seconds=settings.timeout + LEASE_MARGIN)
        if (decision.lease_until, decision.memory, decision.memory_rounds) != (lease, memory, window):
            decision.lease_until, decision.memory, decision.memory_rounds = lease, memory, window
            decision.save(update_fields=["lease_until", "memory", "memory_rounds"])
        return replace(plan, settings=settings, messages=messages, response_format=settings.response_format(name, schema))


def _unrecorded_waits(decision: BotDecision) -> int:
    """Throttled waits of the turn that no request has been charged with yet (they came before a later run)."""
    if not decision.throttled:
        return 0
    recorded = decision.calls.aggregate(n=Sum("throttled"))["n"] or 0
    return max(0, decision.throttled - recorded)


def _close_abandoned_turns(p: Participant, *, keep: int, now: datetime) -> None:
    """Earlier turns of the seat that nobody works on any more (their job was lost with a restarted process;
    the phase default applied at the deadline) are closed, and their unanswered calls marked lost."""
    unclaimed = Q(lease_until__isnull=True) | Q(lease_until__lte=now)
    stale = list(BotDecision.objects.filter(unclaimed, participant=p, status=BotDecision.Status.DECIDING)
                 .exclude(pk=keep).values_list("pk", flat=True))
    if not stale:
        return  # the usual case: one read, no write
    LLMCall.objects.filter(decision__in=stale, status=LLMCall.Status.PENDING).update(
        status=LLMCall.Status.ERROR, error_class="WorkerLost", finished_at=now,
        error_message="The process waiting for this reply stopped; the phase default applied instead.")
    BotDecision.objects.filter(unclaimed, pk__in=stale, status=BotDecision.Status.DECIDING).update(
        status=BotDecision.Status.SKIPPED, applied_at=now, lease_until=None,
        outcome={"skipped": "The turn was abandoned (its process stopped); the phase default applied."})


def _with_problem(plan: Plan, decision: BotDecision, problem: str) -> Plan:
    decision.lease_until = timezone.now() + timedelta(seconds=LEASE_MARGIN)
    decision.save(update_fields=["lease_until"])
    return replace(plan, problem=problem)


def _call_fields(plan: Plan) -> dict[str, Any]:
    return {"participant_id": plan.participant_id, "group_id": plan.group_id, "session_id": plan.session_id,
            "decision_id": plan.decision_id, "profile_id": plan.profile_id, "round_number": plan.round_number,
            "phase": plan.phase}


# ---- 3./4. one attempt ---------------------------------------------------------------------------------

def call_open(plan: Plan, messages: list[dict[str, str]], purpose: str, throttled: int = 0) -> int | None:
    """Record the request before it is sent (so a worker killed mid-call leaves a trace). None: turn lost.
    ``throttled``: how often the turn waited for its profile's limits since its previous request."""
    assert plan.settings is not None
    now = timezone.now()
    # No transaction: the lease renewed, the turn is this worker's until the call's row is written (a worker killed
    # in between leaves a lease that runs out, as one killed during the call does).
    renewed = BotDecision.objects.filter(pk=plan.decision_id, status=BotDecision.Status.DECIDING).update(
        lease_until=now + timedelta(seconds=plan.settings.timeout + LEASE_MARGIN))
    if not renewed:
        return None
    if plan.fresh and purpose == LLMCall.Purpose.DECIDE:
        attempt = 1  # the claim created the turn, and a plan makes one such request (a retry claims again)
    else:
        attempt = LLMCall.objects.filter(decision_id=plan.decision_id).exclude(error_class="MissingKey").count() + 1
    call = LLMCall.objects.create(**_call_fields(plan), attempt=attempt, purpose=purpose, request_messages=messages,
                                  response_format=plan.response_format, model=plan.settings.model,
                                  parameters=plan.settings.parameters(), throttled=throttled)
    return call.pk


def call_close(plan: Plan, call_id: int, messages: list[dict[str, str]], result: llm.ChatResult) -> Correct | RetryAt | None:
    """Record the reply (or failure) and say what happens next."""
    now = timezone.now()
    # At the profile's prices as read at the claim.
    cost = token_cost(plan.prices, result.tokens_in, result.tokens_out) if plan.prices else Decimal("0")
    # The call's row is written once, with its outcome (one UPDATE, not a read and a save of every column).
    reply = {"raw_reply": result.text or "", "refusal": result.refusal or "", "tokens_in": result.tokens_in,
             "tokens_out": result.tokens_out, "cost": cost, "latency_ms": result.latency_ms,
             "model_reported": result.model[:200], "http_status": result.http_status, "finished_at": now}
    events.monitor_on_commit(plan.session_id, None)  # the cockpit's spend and calls in flight changed
    if result.retry_after and result.http_status in (429, 503):
        # The quota (or the server) is the key's, not this seat's: every seat of the profile, on every worker, waits.
        limits.cool_down(plan.limits, result.retry_after)
    if not result.ok:
        _call_update(call_id, reply, status=LLMCall.Status.ERROR, error_class=result.error_class,
                     error_message=result.error_message)
        failures = LLMCall.objects.filter(decision_id=plan.decision_id, status=LLMCall.Status.ERROR).exclude(
            error_class__in=["WorkerLost", "MissingKey"]).count()
        if result.transient and failures <= plan.max_retries:
            wait = result.retry_after if result.retry_after is not None else backoff(failures, plan.rng(f"backoff-{failures}"))
            at = now + timedelta(seconds=wait)
            if at + timedelta(seconds=MIN_RETRY_ROOM) < plan.deadline:
                # Until the retry runs, the turn stays ours: a redelivered copy waits instead of calling too.
                BotDecision.objects.filter(pk=plan.decision_id, status=BotDecision.Status.DECIDING).update(lease_until=at)
                return RetryAt(at, result.error_class)
        return fallback(plan, f"{result.error_class}: {result.error_message}")
    try:
        actions = prompts.interpret(plan.state, result.text, result.refusal)
    except prompts.InvalidAnswer as exc:
        _call_update(call_id, reply, status=LLMCall.Status.INVALID,
                     error_class="Refusal" if exc.code == "refusal" else "InvalidAnswer",
                     error_message=f"{exc.code}: {exc.message}")
        invalid = LLMCall.objects.filter(decision_id=plan.decision_id, status=LLMCall.Status.INVALID).count()
        if invalid < 2:
            return Correct([*messages, {"role": "assistant", "content": result.text or result.refusal or ""},
                            {"role": "user", "content": prompts.correction(exc.message)}])
        return fallback(plan, f"two invalid answers (last: {exc.message})")
    _call_update(call_id, reply, status=LLMCall.Status.OK, parsed=actions)
    decide(plan, actions, source=BotDecision.Source.LLM, call_id=call_id)
    return None


def _call_update(call_id: int, reply: dict[str, Any], **outcome: Any) -> None:
    LLMCall.objects.filter(pk=call_id).update(**reply, **outcome)


def backoff(failures: int, rng: random.Random) -> float:
    """Exponential backoff with jitter, for failures that came without a Retry-After."""
    return min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (failures - 1)) * rng.uniform(0.8, 1.2)


# ---- before each request: budget, then limits ---------------------------------------------------------------

def session_spend(session_id: int, profile_id: int | None) -> Decimal:
    """What the profile's calls in this session have cost so far (US dollars, from the call log)."""
    spent = LLMCall.objects.filter(session_id=session_id, profile_id=profile_id).aggregate(s=Sum("cost"))["s"]
    return spent or Decimal("0")


def budget_stop(plan: Plan) -> bool:
    """When the profile's budget for the session is spent, end the turn without calling the model: the phase
    default applies (whatever the profile's fallback: a scripted stand-in would be another kind of player), and
    the reason is logged (event ``bot.fallback``, the decision's outcome). True when the turn ended so.

    Calls already in flight still finish, so the spend can pass the budget by at most those calls' cost
    (``max_concurrent`` bounds how many there are)."""
    if plan.budget is None:
        return False
    spent = session_spend(plan.session_id, plan.profile_id)
    if spent < plan.budget:
        return False
    fallback(plan, f"budget: the profile has spent ${spent} of its ${plan.budget} budget for this session, "
                   "so the seat makes no more model calls", policy=BotProfile.Fallback.DEFAULT,
             budget=True, budget_usd=str(plan.budget), spent_usd=str(spent))
    return True


def throttled(plan: Plan, wait: limits.Wait, *, inline: bool) -> float | RetryAt | None:
    """The profile's limits refused a request: record the wait, and say how the turn waits. A number: seconds to
    wait in place (short, and only when ``inline``); a :class:`RetryAt`: run the turn again then; None: no wait
    fits before the deadline (the fallback acted), or the turn is not ours any more."""
    now = timezone.now()
    here = inline and wait.seconds <= INLINE_WAIT
    seconds = wait.seconds if here else wait.seconds * random.uniform(1, 1 + THROTTLE_SPREAD)
    at = now + timedelta(seconds=seconds)
    if at + timedelta(seconds=MIN_RETRY_ROOM) >= plan.deadline:
        fallback(plan, f"throttled: the profile's limit ({wait.reason}) let no request out before the deadline",
                 throttled=wait.reason)
        return None
    hold = at + timedelta(seconds=(plan.settings.timeout if plan.settings else 0) + LEASE_MARGIN) if here else at
    with transaction.atomic():
        # Until the retry runs, the turn stays ours (as after a failed request): a redelivered copy waits too.
        updated = BotDecision.objects.filter(pk=plan.decision_id, status=BotDecision.Status.DECIDING).update(
            throttled=F("throttled") + 1, lease_until=hold)
        if updated:
            events.monitor_on_commit(plan.session_id, None)
    if not updated:
        return None
    return seconds if here else RetryAt(at, f"throttled-{wait.reason}")


# ---- 4./5. fallback and decision -----------------------------------------------------------------------

def _event(plan: Plan, type: str, payload: dict[str, Any]) -> None:
    Event.objects.create(session_id=plan.session_id, group_id=plan.group_id, participant_id=plan.participant_id, type=type,
                         round_number=plan.round_number, phase=plan.phase, payload=payload)
    events.monitor_on_commit(plan.session_id, plan.group_id)


def fallback(plan: Plan, reason: str, *, policy: str | None = None, **details: Any) -> None:
    """The profile's fallback policy (or ``policy``): the scripted bot decides, or nothing does and the phase default
    applies. ``details`` go into the event and the decision's outcome."""
    policy = policy or plan.fallback
    with transaction.atomic():
        _event(plan, "bot.fallback", {"policy": policy, "reason": reason[:500], **details})
        if policy == BotProfile.Fallback.SCRIPTED:
            actions = ScriptedBot().decide(plan.state, plan.rng("decide"))
            decide(plan, actions, source=BotDecision.Source.SCRIPTED, call_id=None)
            return
        updated = BotDecision.objects.filter(pk=plan.decision_id, status=BotDecision.Status.DECIDING).update(
            status=BotDecision.Status.DEFAULTED, lease_until=None, decided_at=timezone.now(),
            outcome={"reason": reason[:500], **details})
        if not updated:
            transaction.set_rollback(True)


def release_time(plan: Plan, actions: list[dict[str, Any]], now: datetime) -> datetime:
    """Human-like: the profile's delay after the phase opened, plus typing time for a message; never late.
    At once when the plan is not human-like (AI-only groups)."""
    if not plan.human_like:
        return now
    duration = max(1.0, (plan.deadline - plan.phase_started).total_seconds())
    delay = human_like_delay(plan.delay[0], plan.delay[1], duration, plan.rng("llm-delay"))
    typed = sum(len(a.get("text") or "") for a in actions if a.get("type") == "pitch.submit")
    at = plan.phase_started + timedelta(seconds=delay + typed / max(plan.typing_cps, 0.1))
    latest = plan.deadline - timedelta(seconds=APPLY_MARGIN)
    return max(now, min(at, latest))


def decide(plan: Plan, actions: list[dict[str, Any]], *, source: str, call_id: int | None) -> None:
    """Store the decision and schedule its release, or record it as late when the phase has closed."""
    now = timezone.now()
    stored: dict[str, Any] = {"actions": actions, "source": source, "decided_at": now, "lease_until": None}
    deciding = BotDecision.objects.filter(pk=plan.decision_id, status=BotDecision.Status.DECIDING)
    phase_open = Group.objects.filter(Q(phase_deadline__isnull=True) | Q(phase_deadline__gt=now), pk=plan.group_id,
                                      status=Group.Status.PLAYING, round_number=plan.round_number, phase=plan.phase)
    # One conditional UPDATE is the turn's lock, the check that its phase is still open and the write (alone, it
    # needs no transaction): when another worker finished this turn first, nothing changes (this call stays
    # recorded, not applied).
    apply_at = release_time(plan, actions, now)
    if deciding.filter(Exists(phase_open)).update(**stored, status=BotDecision.Status.DECIDED, apply_at=apply_at):
        schedule("llm_apply", at=apply_at, decision_id=plan.decision_id)  # at once, or after the caller's commit
        return
    with transaction.atomic():
        if not deciding.update(**stored, status=BotDecision.Status.LATE, applied_at=now,
                               outcome={"late": "The phase had closed when the decision arrived."}):
            return
        if call_id is not None:
            LLMCall.objects.filter(pk=call_id).update(status=LLMCall.Status.LATE)
        _event(plan, "bot.late", {"source": source, "decided_at": now.isoformat()})


# ---- 6. release -----------------------------------------------------------------------------------------

def apply(*, decision_id: int) -> None:
    """Send a decided turn's actions through the game services. Idempotent."""
    from experiment import actions as protocol

    with transaction.atomic():
        d = BotDecision.objects.select_for_update(of=("self",)).select_related("group").filter(pk=decision_id).first()
        if d is None or d.status != BotDecision.Status.DECIDED:
            return
        if d.group.paused_at is not None:
            return  # staff paused the group: resuming schedules the seat's turn again, which releases this
        outcome: dict[str, Any] = {}
        applied = closed = False
        for i, action in enumerate(d.actions):
            try:
                protocol.dispatch(d.participant_id, action, automated=True)
            except RuleError as exc:
                outcome[str(i)] = {"code": exc.code, "message": exc.message}
                if exc.code == "already_submitted":
                    applied = True  # a duplicate release: the first one counts
                closed = closed or exc.code in CLOSED_CODES
            else:
                outcome[str(i)] = "applied"
                applied = True
        now = timezone.now()
        d.status = (BotDecision.Status.APPLIED if applied else BotDecision.Status.LATE if closed
                    else BotDecision.Status.REJECTED)
        d.outcome, d.applied_at = outcome, now
        d.save(update_fields=["status", "outcome", "applied_at"])
        ok_calls = LLMCall.objects.filter(decision=d, status=LLMCall.Status.OK)
        if d.status == BotDecision.Status.APPLIED:
            ok_calls.update(applied=True)
        else:
            ok_calls.update(status=LLMCall.Status.LATE)
        if any(v != "applied" for v in outcome.values()):
            Event.objects.create(session_id=d.session_id, group_id=d.group_id, participant_id=d.participant_id,
                                 type="bot.rejected", round_number=d.round_number, phase=d.phase, payload={"outcome": outcome})


# ---- drivers: the same steps, synchronous (Celery) or on an event loop (embedded default) -----------------

def decide_now(*, participant_id: int, round_number: int, phase: str) -> RetryAt | None:
    """Run the turn in this thread (a Celery worker). Returns when to run again, if needed."""
    plan = claim(participant_id=participant_id, round_number=round_number, phase=phase)
    if not isinstance(plan, Plan):
        return plan
    if plan.problem:
        fallback(plan, plan.problem)
        return None
    assert plan.settings is not None
    messages, purpose = plan.messages, LLMCall.Purpose.DECIDE
    waits, waited_here = plan.throttled, False
    while True:
        if budget_stop(plan):
            return None
        grant = limits.acquire(plan.limits)
        if isinstance(grant, limits.Wait):
            pause = throttled(plan, grant, inline=not waited_here)
            if pause is None or isinstance(pause, RetryAt):
                return pause
            waits, waited_here = waits + 1, True
            _release_connection()
            time.sleep(pause)
            continue
        try:
            call_id = call_open(plan, messages, purpose, waits)
            if call_id is None:
                return None
            _release_connection()
            result = _request(plan.settings, messages, plan.response_format)
        finally:
            limits.release(plan.limits, grant)
        waits = 0
        step = call_close(plan, call_id, messages, result)
        if not isinstance(step, Correct):
            return step
        messages, purpose = step.messages, LLMCall.Purpose.CORRECTION


def _release_connection() -> None:
    """Give the database connection back (to the process's pool) while the turn waits for its model: a thread-pool
    worker runs hundreds of turns at once on a pool of a few connections, which would otherwise cap the turns in
    flight at the pool's size, each holding its connection idle for the model's latency. Not inside a transaction:
    a caller's (a test's) would be lost."""
    if not connection.in_atomic_block:
        close_old_connections()


def _request(settings: llm.LLMSettings, messages: list[dict[str, Any]],
             response_format: dict[str, Any] | None) -> llm.ChatResult:
    """One request from a plain thread, made on the shared loop. The client's own timeout ends it; the
    wait here is bounded as well, because a thread-pool Celery worker enforces no time limit."""
    started = time.perf_counter()
    future = background.submit(llm.acomplete(settings, messages, response_format))
    try:
        return future.result(timeout=settings.timeout + LEASE_MARGIN)
    except concurrent.futures.TimeoutError:
        future.cancel()
        return llm.timed_out(settings, round((time.perf_counter() - started) * 1000), settings.timeout + LEASE_MARGIN)


def _db_step(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """One database step of a turn, with fresh connections. Each step is safe to run again, so a step that
    SQLite refused because another thread held its write lock is retried (its busy timeout does not cover
    every case, e.g. shared-cache databases)."""
    for attempt in range(SQLITE_LOCK_RETRIES):
        close_old_connections()
        try:
            return fn(*args, **kwargs)
        except OperationalError as exc:
            if "locked" not in str(exc) or attempt == SQLITE_LOCK_RETRIES - 1:
                raise
            time.sleep(0.02 * (attempt + 1))
        finally:
            close_old_connections()
    raise AssertionError("unreachable")


async def decide_async(*, participant_id: int, round_number: int, phase: str) -> RetryAt | None:
    """The same turn on an event loop: database steps in a small thread pool, the model call awaited."""
    db = background.db
    plan = await db(claim, participant_id=participant_id, round_number=round_number, phase=phase)
    if not isinstance(plan, Plan):
        return plan
    if plan.problem:
        await db(fallback, plan, plan.problem)
        return None
    assert plan.settings is not None
    messages, purpose = plan.messages, LLMCall.Purpose.DECIDE
    waits, waited_here = plan.throttled, False
    while True:
        if await db(budget_stop, plan):
            return None
        grant = await db(limits.acquire, plan.limits)  # Redis is a blocking client: not on the loop
        if isinstance(grant, limits.Wait):
            pause = await db(throttled, plan, grant, inline=not waited_here)
            if pause is None or isinstance(pause, RetryAt):
                return pause
            waits, waited_here = waits + 1, True
            await asyncio.sleep(pause)
            continue
        try:
            call_id = await db(call_open, plan, messages, purpose, waits)
            if call_id is None:
                return None
            result = await llm.acomplete(plan.settings, messages, plan.response_format)
        finally:
            await db(limits.release, plan.limits, grant)
        waits = 0
        step = await db(call_close, plan, call_id, messages, result)
        if not isinstance(step, Correct):
            return step
        messages, purpose = step.messages, LLMCall.Purpose.CORRECTION


class Background:
    """An event loop in a daemon thread (one per process) where LLM requests wait on the network.

    Embedded default: whole turns run here. The in-process scheduler runs jobs in a handful of threads;
    a job that waited for a model there would hold one for seconds and could delay phase deadlines. Here
    hundreds of turns wait at once on one loop, and only their short database steps borrow a thread.

    Celery: the task's thread runs the turn and hands only the request to this loop (:func:`_request`), so
    a worker with a thread pool of hundreds shares one connection pool and one async client, which
    costs a fraction of the CPU of hundreds of synchronous clients (bench/bots.py --threads).
    """

    def __init__(self, *, db_threads: int = 4) -> None:
        self._db_threads = db_threads
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._futures: set[concurrent.futures.Future[Any]] = set()
        self._pid = os.getpid()

    def _ensure(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._loop.is_closed() or self._pid != os.getpid():  # a fork has no thread
                loop = asyncio.new_event_loop()
                # SQLite has one writer at a time: more threads would only queue on its lock.
                threads = 1 if connection.vendor == "sqlite" else self._db_threads
                self._executor = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="llm-db")
                threading.Thread(target=loop.run_forever, name="llm-loop", daemon=True).start()
                self._loop, self._pid = loop, os.getpid()
                self._futures = set()
                atexit.register(self._close, loop)
            return self._loop

    @staticmethod
    def _close(loop: asyncio.AbstractEventLoop) -> None:
        """At exit: close the loop's HTTP sessions (open connections would be reported as leaked)."""
        if loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(llm.close_async_clients(), loop).result(timeout=2)

    async def db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: _db_step(fn, *args, **kwargs))

    def submit(self, coro: Any) -> concurrent.futures.Future[Any]:
        future = asyncio.run_coroutine_threadsafe(coro, self._ensure())
        with self._lock:
            self._futures.add(future)
        future.add_done_callback(self._done)
        return future

    def _done(self, future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._futures.discard(future)
        if not future.cancelled() and future.exception() is not None:
            logger.error("LLM turn failed", exc_info=future.exception())

    def busy(self) -> int:
        with self._lock:
            return len(self._futures)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no turn is running (tests). True when idle."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                pending = list(self._futures)
            if not pending:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            concurrent.futures.wait(pending, timeout=left)


background = Background()


async def _turn(participant_id: int, round_number: int, phase: str) -> None:
    step = await decide_async(participant_id=participant_id, round_number=round_number, phase=phase)
    if step is not None:
        submit("llm_decide", at=step.at, participant_id=participant_id, round_number=round_number, phase=phase)


def decide_in_background(*, participant_id: int, round_number: int, phase: str) -> None:
    """The embedded default's ``llm_decide`` job: hand the turn to :data:`background` and return at once."""
    background.submit(_turn(participant_id, round_number, phase))

