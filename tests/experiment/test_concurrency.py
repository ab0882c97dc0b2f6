"""Submissions at the same instant: real threads with their own database connections (the group
row lock is what serialises them on PostgreSQL), and the same over two websockets at once.
Exactly one row per decision, and a phase advances exactly once."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.utils import timezone

from experiment import services
from experiment.game import RuleError
from experiment.models import Choice, Event, Group, Participant
from tests.experiment import gamekit
from tests.wsclient import Seat

pytestmark = [pytest.mark.django_db(transaction=True)]
executor_connections_closed = gamekit.executor_connections_closed
P = Participant
ROUNDS_OF_RACING = 4


@pytest.fixture
def threads_race() -> None:
    """Threads racing on an in-memory SQLite test database hit its shared-cache table locks ("database
    table is locked"), which the embedded default never uses: it runs on a file in WAL mode with
    IMMEDIATE transactions, where these tests pass (checked with the test database on a file)."""
    if connection.vendor == "sqlite" and connection.is_in_memory_db():
        pytest.skip("in-memory shared-cache SQLite locks whole tables; run on PostgreSQL or a file database")


def _race(*calls: Callable[[], object]) -> list[str]:
    """Run the calls in threads released at the same instant. Returns "ok" or the RuleError code of each."""
    barrier = threading.Barrier(len(calls))
    results: list[str] = [""] * len(calls)

    def run(i: int, call: Callable[[], object]) -> None:
        try:
            barrier.wait(timeout=10)
            call()
            results[i] = "ok"
        except RuleError as exc:
            results[i] = exc.code
        except Exception as exc:  # anything else is a failure the test must see
            results[i] = f"crash: {exc!r}"
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


def _phase_starts(group: Group, round_number: int, phase: str) -> int:
    return Event.objects.filter(group=group, type="phase.started", round_number=round_number, phase=phase).count()


def _in_choice() -> tuple[Group, dict[str, Participant], str]:
    group = gamekit.group_start(n_rounds=ROUNDS_OF_RACING, belief_rounds="", dropout_after=100)
    gamekit.pitch_all(group)
    seats = gamekit.seats(group)
    human = next(p for p in seats.values() if p.role == P.Role.CANDIDATE and p.kind == P.Kind.HUMAN)
    return group, seats, human.seat


def _next_round(group: Group) -> None:
    """Finish the round quickly: returns by deadline, feedback by deadline, pitches."""
    while gamekit.at(group)[1] in ("return", "feedback"):
        gamekit.deadline_pass(group)
    gamekit.pitch_all(group)


@pytest.mark.usefixtures("threads_race")
def test_two_selectors_at_the_same_instant() -> None:
    group, seats, target = _in_choice()
    assert services.progress(gamekit.fresh(group), group.session.experiment.params()) == {"done": 0, "of": 2}
    for r in range(1, ROUNDS_OF_RACING + 1):
        assert gamekit.at(group) == (r, "choice")
        version = gamekit.fresh(group).version
        results = _race(
            lambda r=r: services.choice_submit(participant_id=seats["S1"].pk, round_number=r, candidate=target, amount=3),
            lambda r=r: services.choice_submit(participant_id=seats["S2"].pk, round_number=r, candidate=target, amount=7),
        )
        assert results == ["ok", "ok"], results
        rows = Choice.objects.filter(group=group, round_number=r)
        assert sorted(rows.values_list("selector__seat", "sent", "timed_out")) == [("S1", 3, False), ("S2", 7, False)]
        # The last of the two closed the choice phase, exactly once.
        assert _phase_starts(group, r, "return") == 1
        assert Event.objects.filter(group=group, type="phase.closed", round_number=r, phase="choice").count() == 1
        assert gamekit.at(group) == (r, "return")
        # Two accepted actions and one phase change, each counted once in the version.
        assert gamekit.fresh(group).version == version + 3
        if r < ROUNDS_OF_RACING:
            _next_round(group)


@pytest.mark.usefixtures("threads_race")
def test_the_same_choice_sent_twice_at_once() -> None:
    group, seats, target = _in_choice()
    for r in range(1, ROUNDS_OF_RACING + 1):
        results = _race(*[
            lambda r=r: services.choice_submit(participant_id=seats["S1"].pk, round_number=r, candidate=target, amount=4)
        ] * 2)
        assert sorted(results) == ["already_submitted", "ok"], results
        assert Choice.objects.filter(selector=seats["S1"], round_number=r).count() == 1
        assert Event.objects.filter(group=group, type="choice.submitted", participant=seats["S1"], round_number=r).count() == 1
        assert gamekit.at(group) == (r, "choice")  # S2 has not chosen: nothing advanced
        services.choice_submit(participant_id=seats["S2"].pk, round_number=r, candidate=target, amount=1)
        if r < ROUNDS_OF_RACING:
            _next_round(group)


@pytest.mark.usefixtures("threads_race")
def test_a_choice_racing_the_deadline_is_stored_once() -> None:
    """Either the choice gets in before the phase closes, or it is refused and the default applies: never both."""
    group, seats, target = _in_choice()
    outcomes = set()
    for r in range(1, ROUNDS_OF_RACING + 1):
        services.choice_submit(participant_id=seats["S2"].pk, round_number=r, candidate=target, amount=2)
        due = timezone.now() + timedelta(seconds=0.3)
        Group.objects.filter(pk=group.pk).update(phase_deadline=due)

        def at_deadline(call: Callable[[], object], due=due) -> Callable[[], object]:
            def wrapped() -> object:
                time.sleep(max(0.0, (due - timezone.now()).total_seconds()))
                return call()
            return wrapped

        results = _race(
            at_deadline(lambda r=r: services.choice_submit(participant_id=seats["S1"].pk, round_number=r, candidate=target,
                                                           amount=9)),
            at_deadline(services.sweep),
        )
        assert not any(x.startswith("crash") for x in results), results
        [row] = Choice.objects.filter(selector=seats["S1"], round_number=r)
        if results[0] == "ok":
            assert (row.sent, row.timed_out) == (9, False)
        else:
            assert results[0] in ("phase_closed", "wrong_phase"), results
            assert (row.sent, row.timed_out) == (0, True)
        outcomes.add(results[0])
        assert _phase_starts(group, r, "return") == 1
        if r < ROUNDS_OF_RACING:
            _next_round(group)
    assert outcomes  # (which side wins is up to the scheduler; both are correct)


def test_a_late_deadline_job_does_not_wait_for_the_lock_of_a_group_in_its_next_phase(threads_race) -> None:
    """The group's last decision closed the pitch phase; its deadline job comes while someone holds the
    group's lock for an action in the choice phase. The job must see at once that it has nothing to do."""
    group, _, _ = _in_choice()
    Group.objects.filter(pk=group.pk).update(phase_deadline=timezone.now() - timedelta(seconds=1))
    locked, release = threading.Event(), threading.Event()

    def hold_lock() -> None:
        try:
            with transaction.atomic():
                Group.objects.select_for_update().get(pk=group.pk)
                locked.set()
                release.wait(timeout=30)
        finally:
            connection.close()

    postgres = connection.vendor == "postgresql"  # there, waiting for the lock fails this test instead of hanging it
    holder = threading.Thread(target=hold_lock)
    holder.start()
    try:
        assert locked.wait(timeout=10)
        if postgres:
            with connection.cursor() as cursor:
                cursor.execute("SET lock_timeout = '2s'")
        assert not services.phase_close(group_id=group.pk, round_number=1, phase="pitch", reason="deadline")
    finally:
        release.set()
        holder.join(timeout=30)
        if postgres:
            with connection.cursor() as cursor:
                cursor.execute("RESET lock_timeout")
    # A job for the phase that is open takes the lock and checks again under it (here: overdue, so it closes).
    assert services.phase_close(group_id=group.pk, round_number=1, phase="choice", reason="deadline")
    assert gamekit.at(group) == (1, "return")
    assert _phase_starts(group, 1, "return") == 1


async def test_two_selectors_and_a_double_click_over_websockets() -> None:
    group, seats, target = await gamekit.db(_in_choice)()
    s1, s2 = await Seat(seats["S1"].token).connect(), await Seat(seats["S2"].token).connect()
    s1_other_tab = await Seat(seats["S1"].token).connect()
    choice = {"type": "choice.submit", "round": 1, "candidate": target, "amount": 5}
    replies = await asyncio.gather(s1.send({**choice, "ref": "tab1"}), s1_other_tab.send({**choice, "ref": "tab2"}))
    assert sorted((r["type"], r.get("code")) for r in replies) == [("ack", None), ("error", "already_submitted")]
    assert (await gamekit.db(gamekit.at)(group)) == (1, "choice")
    # S2 and a late repeat of S1 at the same instant.
    replies = await asyncio.gather(s2.send({**choice, "amount": 6}), s1.send(choice))
    assert replies[0]["type"] == "ack" and replies[1]["code"] in ("already_submitted", "wrong_phase")

    @gamekit.db
    def check() -> None:
        assert sorted(Choice.objects.filter(group=group).values_list("selector__seat", "sent")) == [("S1", 5), ("S2", 6)]
        assert _phase_starts(group, 1, "return") == 1
        assert gamekit.at(group) == (1, "return")

    await check()
    for seat in (s1, s2, s1_other_tab):
        state = await seat.until(seat.in_phase(1, "return"))
        assert state["game"]["my_choice"]["sent"] == (6 if seat is s2 else 5)
        await seat.close()
