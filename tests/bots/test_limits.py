"""Rate limits and budgets of bot profiles (bots/limits.py, bots.decisions.admit steps).

The limiter's rules are checked on both of its stores: Redis (shared by every worker; the real server) and the
embedded default's memory. Turns run through the real openai client against the fake server, whose request count
shows whether a call went out.
"""

from __future__ import annotations

import itertools
import logging
import random
import socket
import threading
import time
from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from bots import decisions, limits
from bots.decisions import RetryAt
from bots.fake_openai import FakeOpenAI, Reply
from bots.models import BotDecision, BotProfile, LLMCall
from bots.selectors import llm_live
from experiment import export, services
from experiment.models import Event, Group, Message, Participant
from tests.bots.conftest import group_with, profile_create, seat_of

P = Participant
_ids = itertools.count(random.randrange(10**6, 10**9))  # profile ids of the limiter's own tests: never a real one's


def fresh(group: Group) -> Group:
    return Group.objects.get(pk=group.pk)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["redis", "memory"])
def store(request: pytest.FixtureRequest, settings, monkeypatch: pytest.MonkeyPatch):
    if request.param == "redis":
        if not settings.PRODUCTION_SERVICES:
            pytest.skip("Redis not reachable on this machine (CI requires it)")
        chosen = limits.RedisLimiter(settings.TEST_REDIS_URL)
    else:
        chosen = limits.LocalLimiter()
    monkeypatch.setattr(limits, "limiter", lambda: chosen)
    return chosen


def lim(**fields) -> limits.Limits:
    return limits.Limits(profile_id=next(_ids), **fields)


# ---- the limiter's rules -------------------------------------------------------------------------------------

def test_the_bucket_lets_a_minute_of_requests_through_then_one_every_60_over_rpm_seconds(store) -> None:
    rule = lim(requests_per_minute=120)
    assert all(isinstance(limits.acquire(rule), limits.Grant) for _ in range(120))
    refused = limits.acquire(rule)
    assert isinstance(refused, limits.Wait) and refused.reason == "rate" and 0.3 < refused.seconds <= 0.5
    time.sleep(refused.seconds + 0.05)
    assert isinstance(limits.acquire(rule), limits.Grant)
    assert isinstance(limits.acquire(rule), limits.Wait)  # one token came back, and it is spent


def test_requests_at_once_are_capped_and_a_reply_frees_its_slot(store) -> None:
    rule = lim(max_concurrent=2)
    first, second = limits.acquire(rule), limits.acquire(rule)
    assert isinstance(first, limits.Grant) and isinstance(second, limits.Grant) and first.lease != second.lease
    refused = limits.acquire(rule)
    assert isinstance(refused, limits.Wait) and refused.reason == "concurrency"
    assert 0 < refused.seconds <= limits.CONCURRENCY_POLL
    limits.release(rule, first)
    assert isinstance(limits.acquire(rule), limits.Grant)


def test_a_slot_whose_worker_died_frees_itself_when_its_lease_ends(store) -> None:
    rule = lim(max_concurrent=1, lease_seconds=0.3)
    assert isinstance(limits.acquire(rule), limits.Grant)  # never released: its worker was killed
    assert isinstance(limits.acquire(rule), limits.Wait)
    time.sleep(0.35)
    assert isinstance(limits.acquire(rule), limits.Grant)


def test_a_retry_after_pauses_the_whole_profile_and_a_shorter_one_does_not_cut_it(store) -> None:
    rule = lim()  # no limit of its own: the endpoint's pause still holds
    limits.cool_down(rule, 1.0)
    limits.cool_down(rule, 0.1)
    refused = limits.acquire(rule)
    assert isinstance(refused, limits.Wait) and refused.reason == "cooldown" and 0.8 < refused.seconds <= 1.0
    time.sleep(refused.seconds + 0.05)
    assert isinstance(limits.acquire(rule), limits.Grant)


def test_workers_racing_for_tokens_and_slots_never_get_more_than_the_limits(settings) -> None:
    """Eight workers (each with its own Redis connection, as separate processes have) ask at the same time."""
    if not settings.PRODUCTION_SERVICES:
        pytest.skip("Redis not reachable on this machine (CI requires it)")
    rate, slots = lim(requests_per_minute=50), lim(max_concurrent=5)
    granted = {"rate": 0, "slots": 0}
    lock, start = threading.Lock(), threading.Barrier(8)

    def worker() -> None:
        own = limits.RedisLimiter(settings.TEST_REDIS_URL)
        start.wait()
        for _ in range(30):
            for name, rule in (("rate", rate), ("slots", slots)):
                if isinstance(own.acquire(rule), limits.Grant):
                    with lock:
                        granted[name] += 1

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # 240 tries each; refilling at 50/min adds well under one token while they run.
    assert granted == {"rate": 50, "slots": 5}


def test_deployments_sharing_a_redis_server_keep_their_own_counts(settings) -> None:
    """Profile ids repeat between deployments: the keys carry the deployment's prefix (issue 0)."""
    if not settings.PRODUCTION_SERVICES:
        pytest.skip("Redis not reachable on this machine (CI requires it)")
    shared = limits.RedisLimiter(settings.TEST_REDIS_URL)
    rule = lim(requests_per_minute=1)
    prefix = settings.PARTNERLAB_CHANNEL_PREFIX
    assert isinstance(shared.acquire(rule), limits.Grant) and isinstance(shared.acquire(rule), limits.Wait)
    assert all(k.startswith(prefix + ":") for k in limits.keys(rule))
    settings.PARTNERLAB_CHANNEL_PREFIX = prefix + "-other"
    assert isinstance(shared.acquire(rule), limits.Grant)


def test_without_redis_requests_go_out_unlimited_and_the_log_says_so(monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    dead = limits.RedisLimiter(f"redis://127.0.0.1:{closed_port()}/0")
    monkeypatch.setattr(limits, "limiter", lambda: dead)
    monkeypatch.setitem(limits._warned, "at", float("-inf"))
    rule = lim(requests_per_minute=1, max_concurrent=1)
    with caplog.at_level(logging.WARNING, logger="bots.limits"):
        grants = [limits.acquire(rule) for _ in range(3)]
        limits.release(rule, limits.Grant("x"))
        limits.cool_down(rule, 1)
    assert all(isinstance(g, limits.Grant) and g.degraded for g in grants)
    warnings = [r for r in caplog.records if "without the profiles' rate and concurrency limits" in r.getMessage()]
    assert len(warnings) == 1  # once a minute, not once a request


# ---- the profile's fields ------------------------------------------------------------------------------------

@pytest.mark.django_db
@pytest.mark.parametrize(("fields", "field", "words"), [
    ({"max_concurrent": 0}, "max_concurrent", "at least 1 request at a time"),
    ({"requests_per_minute": 0}, "requests_per_minute", "at least 1 request per minute"),
    ({"budget_per_session_usd": Decimal("0")}, "budget_per_session_usd", "more than 0 US dollars"),
    ({"budget_per_session_usd": Decimal("1"), "price_input_per_1k": 0, "price_output_per_1k": 0},
     "budget_per_session_usd", "needs the profile's prices"),
])
def test_bad_limits_are_refused_with_the_reason_and_nothing_is_saved(fake: FakeOpenAI, fields, field, words) -> None:
    with pytest.raises(ValidationError) as refused:
        profile_create(fake.base_url, **fields)
    assert words in " ".join(refused.value.message_dict[field])
    assert not BotProfile.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("fields", [{"max_concurrent": 0}, {"requests_per_minute": 0}, {"budget_per_session_usd": 0}])
def test_the_database_refuses_limits_that_skip_validation(profile: BotProfile, fields) -> None:
    with pytest.raises(IntegrityError), transaction.atomic():
        BotProfile.objects.filter(pk=profile.pk).update(**fields)
    profile.refresh_from_db()
    assert (profile.max_concurrent, profile.requests_per_minute, profile.budget_per_session_usd) == (None, None, None)


# ---- turns under the limits ----------------------------------------------------------------------------------

@pytest.mark.django_db
def test_a_turn_over_the_rate_runs_again_later_without_calling(fake: FakeOpenAI) -> None:
    profile = profile_create(fake.base_url, requests_per_minute=1)
    first = seat_of(group_with(profile, pitch_seconds=300), kind="bot")
    second = seat_of(group_with(profile, pitch_seconds=300), kind="bot")
    assert decisions.decide_now(participant_id=first.pk, round_number=1, phase="pitch") is None
    before = timezone.now()
    step = decisions.decide_now(participant_id=second.pk, round_number=1, phase="pitch")
    assert isinstance(step, RetryAt) and step.reason == "throttled-rate"
    assert before + timedelta(seconds=59) <= step.at <= timezone.now() + timedelta(seconds=60 * 1.5)
    assert len(fake.requests) == 1
    d = BotDecision.objects.get(participant=second)
    assert (d.status, d.throttled, d.lease_until) == (BotDecision.Status.DECIDING, 1, step.at)
    # A copy of the task meanwhile finds the turn held and neither calls nor counts another wait.
    again = decisions.decide_now(participant_id=second.pk, round_number=1, phase="pitch")
    assert isinstance(again, RetryAt) and again.reason == "busy" and len(fake.requests) == 1
    (row,) = llm_live(session_id=second.session_id)
    assert (row["calls"], row["throttled"], row["requests_per_minute"]) == (0, 1, 1)


@pytest.mark.django_db
def test_a_turn_the_limits_keep_until_the_deadline_lets_the_fallback_act(fake: FakeOpenAI) -> None:
    profile = profile_create(fake.base_url, requests_per_minute=1)
    assert decisions.decide_now(participant_id=seat_of(group_with(profile), kind="bot").pk, round_number=1,
                                phase="pitch") is None
    bot = seat_of(group_with(profile), kind="bot")  # 60 s pitch: the next token comes too late
    assert decisions.decide_now(participant_id=bot.pk, round_number=1, phase="pitch") is None
    d = BotDecision.objects.get(participant=bot)
    assert (d.status, d.source) == (BotDecision.Status.DECIDED, BotDecision.Source.SCRIPTED)
    assert len(fake.requests) == 1 and not LLMCall.objects.filter(participant=bot).exists()
    event = Event.objects.get(participant=bot, type="bot.fallback")
    assert event.payload["throttled"] == "rate" and "before the deadline" in event.payload["reason"]


@pytest.mark.django_db(transaction=True)
def test_requests_at_once_hold_across_seats_deciding_together(fake: FakeOpenAI) -> None:
    profile = profile_create(fake.base_url, max_concurrent=1)
    group = group_with(profile, n_candidates=3, n_bot_candidates=2)
    bots = list(Participant.objects.filter(group=group, kind=P.Kind.BOT).order_by("seat"))
    assert len(bots) == 2
    fake.latency = 0.6
    errors: list[BaseException] = []

    def play(bot: Participant) -> None:
        try:
            while (step := decisions.decide_now(participant_id=bot.pk, round_number=1, phase="pitch")) is not None:
                time.sleep(max(0.0, (step.at - timezone.now()).total_seconds()))
        except BaseException as exc:  # reported below, in the test thread
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=play, args=(b,)) for b in bots]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert len(fake.requests) == 2 and fake.most_in_flight == 1
    turns = list(BotDecision.objects.filter(participant__in=bots))
    assert all((d.status, d.source) == (BotDecision.Status.DECIDED, BotDecision.Source.LLM) for d in turns)
    assert sum(d.throttled for d in turns) >= 1  # the second seat waited for the first one's reply
    for d in turns:  # every wait is on the request it delayed, in the export's llm_calls
        assert sum(LLMCall.objects.filter(decision=d).values_list("throttled", flat=True)) == d.throttled


@pytest.mark.django_db
def test_a_retry_after_to_one_seat_holds_back_the_profiles_other_seats(fake: FakeOpenAI, profile: BotProfile) -> None:
    first = seat_of(group_with(profile), kind="bot")
    second = seat_of(group_with(profile), kind="bot")
    fake.script(Reply.error(429, retry_after=1))
    failed = decisions.decide_now(participant_id=first.pk, round_number=1, phase="pitch")
    assert isinstance(failed, RetryAt) and failed.reason == "RateLimitError"
    held = decisions.decide_now(participant_id=second.pk, round_number=1, phase="pitch")
    assert isinstance(held, RetryAt) and held.reason == "throttled-cooldown"
    assert held.at >= failed.at - timedelta(seconds=0.05)  # not before the endpoint said
    assert len(fake.requests) == 1
    time.sleep(max(0.0, (held.at - timezone.now()).total_seconds()) + 0.05)
    assert decisions.decide_now(participant_id=second.pk, round_number=1, phase="pitch") is None
    assert decisions.decide_now(participant_id=first.pk, round_number=1, phase="pitch") is None
    assert len(fake.requests) == 3
    assert LLMCall.objects.get(participant=second).throttled == 1


@pytest.mark.django_db
def test_a_turn_goes_on_unlimited_when_redis_is_down(fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    dead = limits.RedisLimiter(f"redis://127.0.0.1:{closed_port()}/0")
    monkeypatch.setattr(limits, "limiter", lambda: dead)
    profile = profile_create(fake.base_url, requests_per_minute=1, max_concurrent=1)
    for _ in range(2):
        bot = seat_of(group_with(profile), kind="bot")
        assert decisions.decide_now(participant_id=bot.pk, round_number=1, phase="pitch") is None
    assert len(fake.requests) == 2  # fail open: both went out (the endpoint's own 429s would still be honoured)


# ---- the session budget --------------------------------------------------------------------------------------

@pytest.mark.django_db
def test_a_spent_budget_stops_the_calls_and_the_phase_default_applies(fake: FakeOpenAI) -> None:
    # 1,000 prompt tokens at $0.15 / 1k: the first call costs $0.15 of a $0.10 budget (the profile's fallback is
    # the scripted bot, yet the budget leaves the phase default: no other kind of player takes over).
    profile = profile_create(fake.base_url, budget_per_session_usd=Decimal("0.10"))
    group = group_with(profile, n_candidates=3, n_bot_candidates=2)
    first, second = Participant.objects.filter(group=group, kind=P.Kind.BOT).order_by("seat")
    fake.script(Reply(prompt_tokens=1000, completion_tokens=0))
    assert decisions.decide_now(participant_id=first.pk, round_number=1, phase="pitch") is None
    assert decisions.session_spend(group.session_id, profile.pk) == Decimal("0.15")
    assert decisions.decide_now(participant_id=second.pk, round_number=1, phase="pitch") is None
    assert len(fake.requests) == 1 and not LLMCall.objects.filter(participant=second).exists()
    d = BotDecision.objects.get(participant=second)
    assert (d.status, d.actions, d.outcome["budget"]) == (BotDecision.Status.DEFAULTED, [], True)
    event = Event.objects.get(participant=second, type="bot.fallback")
    assert event.payload["policy"] == "default" and event.payload["reason"].startswith("budget:")
    assert (event.payload["budget_usd"], event.payload["spent_usd"]) == ("0.1000", "0.150000")
    # The export's events table carries the reason.
    scope, options = export.Scope.for_sessions([group.session_id]), export.Options(recruitment="omit")
    names = [c.name for c in export.columns_of(export.table("events"))]
    payloads = [dict(zip(names, r, strict=True))["payload"] for r in export.rows(export.table("events"), scope=scope,
                                                                                 options=options)]
    assert any("budget:" in str(p) for p in payloads)
    # The seat still owes its pitch: the deadline gives it the phase default, like a person who wrote nothing.
    Group.objects.filter(pk=group.pk).update(phase_deadline=timezone.now() - timedelta(seconds=1))
    services.sweep()
    message = Message.objects.get(candidate=second)
    assert (message.text, message.timed_out) == ("", True)
    (row,) = llm_live(session_id=group.session_id)
    assert (row["cost"], row["budget"], row["budget_used"], row["budget_stops"]) == ("0.150000", "0.1000", 1.5, 1)


@pytest.mark.django_db
def test_under_budget_the_calls_go_on(fake: FakeOpenAI) -> None:
    profile = profile_create(fake.base_url, budget_per_session_usd=Decimal("1.00"))
    group = group_with(profile, n_candidates=3, n_bot_candidates=2)
    for bot in Participant.objects.filter(group=group, kind=P.Kind.BOT):
        assert decisions.decide_now(participant_id=bot.pk, round_number=1, phase="pitch") is None
    assert len(fake.requests) == 2
    assert not BotDecision.objects.filter(session=group.session, status=BotDecision.Status.DEFAULTED).exists()
    assert fresh(group).phase == "pitch"


# ---- the cockpit, live ---------------------------------------------------------------------------------------

@pytest.fixture
def staff_client(client, db):
    from django.contrib.auth import get_user_model

    client.force_login(get_user_model().objects.create_user("boss", password="pw-boss-123", is_staff=True))
    return client


@pytest.mark.django_db(transaction=True)
async def test_the_monitor_shows_spend_and_throttling_as_they_happen(staff_client, fake: FakeOpenAI) -> None:
    import json

    from channels.db import database_sync_to_async as in_thread
    from channels.testing import WebsocketCommunicator

    from config.asgi import application

    profile = await in_thread(profile_create)(fake.base_url, requests_per_minute=1, budget_per_session_usd=Decimal("2"))
    group = await in_thread(group_with)(profile, n_candidates=3, n_bot_candidates=2, pitch_seconds=300)
    first, second = await in_thread(lambda: list(Participant.objects.filter(group=group, kind=P.Kind.BOT).order_by("seat")))()
    cookie = f"sessionid={staff_client.cookies['sessionid'].value}".encode()
    comm = WebsocketCommunicator(application, f"/ws/monitor/{group.session_id}/",
                                 headers=[(b"origin", b"http://127.0.0.1"), (b"host", b"127.0.0.1"), (b"cookie", cookie)])
    assert (await comm.connect())[0]
    state = json.loads(await comm.receive_from(timeout=5))
    assert [(r["profile"], r["calls"], r["cost"], r["budget"], r["throttled"]) for r in state["bots"]] == [
        (profile.name, 0, "0.000000", "2.0000", 0)]

    fake.script(Reply(prompt_tokens=2000, completion_tokens=500))  # $0.30 + $0.30
    assert await in_thread(decisions.decide_now)(participant_id=first.pk, round_number=1, phase="pitch") is None
    assert isinstance(await in_thread(decisions.decide_now)(participant_id=second.pk, round_number=1, phase="pitch"), RetryAt)

    async def latest_bots() -> dict:
        seen = None
        while not await comm.receive_nothing(timeout=1.5):  # the updates are coalesced: read until the socket is quiet
            msg = json.loads(await comm.receive_from(timeout=5))
            if msg["type"] == "monitor.session":
                seen = msg["bots"][0]
        return seen

    row = await latest_bots()
    assert (row["calls"], row["cost"], row["budget_used"], row["in_flight"], row["throttled"]) == (1, "0.600000", 0.3, 0, 1)
    await comm.disconnect()


@pytest.mark.django_db
def test_the_spend_page_shows_budget_and_throttling(staff_client, fake: FakeOpenAI) -> None:
    profile = profile_create(fake.base_url, requests_per_minute=1, max_concurrent=3, budget_per_session_usd=Decimal("0.5"))
    group = group_with(profile, n_candidates=3, n_bot_candidates=2, pitch_seconds=300)
    for bot in Participant.objects.filter(group=group, kind=P.Kind.BOT):
        decisions.decide_now(participant_id=bot.pk, round_number=1, phase="pitch")
    page = staff_client.get(f"/cockpit/sessions/{group.session_id}/spend/").content.decode()
    table = page[page.index('id="limits"'):]
    row = table[table.index(profile.name):table.index("</tr>", table.index(profile.name))]
    cells = [c.split(">", 1)[1] for c in row.split("<td")[1:]]
    cells = [c[: c.index("</td>")] for c in cells]
    cost = str(LLMCall.objects.get(session_id=group.session_id).cost)
    assert cells == [cost, "0.5000", "1", "0", "1", "0", "1", "3"]
