"""An AI-only society on the production stack: ``manage.py society`` (production settings) starts the groups,
real Celery workers ask the language models (the fake OpenAI-compatible server, through the real openai client),
write to PostgreSQL and open the next phases; nobody's browser is involved."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from bots.fake_openai import FakeOpenAI
from bots.models import BotDecision, LLMCall
from experiment.models import Choice, Condition, Event, Group, Message, Participant, Return, Session, Society
from tests import factories
from tests.bots.conftest import KEY, KEY_ENV, profile_create
from tests.bots.test_celery_worker import _database_url, broker, procs, workers  # noqa: F401 (fixtures)
from tests.livestack import PYTHON, ROOT, Proc, clean_env, run_command

pytestmark = [pytest.mark.production_stack, pytest.mark.django_db(transaction=True)]
GROUPS, ROUNDS = 2, 2


def test_manage_py_society_runs_llm_groups_through_celery_workers(fake: FakeOpenAI, broker: str,  # noqa: F811
                                                                    workers: Callable[..., Proc]) -> None:  # noqa: F811
    fake.latency = 0.3
    profile = profile_create(fake.base_url, delay_min=5.0, delay_max=10.0)  # would be felt if AI-only groups waited
    experiment = factories.experiment_create(conditions=(), n_selectors=2, n_bot_selectors=2, n_candidates=2,
                                             n_bot_candidates=2, n_rounds=ROUNDS, belief_rounds="", pitch_seconds=20,
                                             choice_seconds=20, return_seconds=20, feedback_seconds=1, belief_seconds=20)
    Condition.objects.create(experiment=experiment, name="llm-only", society=Society.AI_ONLY, bot_profile=profile)
    workers()
    env = clean_env(DJANGO_SETTINGS_MODULE="tests.bots.worker_settings", DJANGO_SECRET_KEY="x" * 60,
                    DJANGO_ALLOWED_HOSTS="127.0.0.1", DATABASE_URL=_database_url(), REDIS_URL=broker, **{KEY_ENV: KEY})
    out = run_command([PYTHON, str(ROOT / "manage.py"), "society", "--experiment", experiment.slug, "--groups",
                       str(GROUPS), "--seed", "5", "--json", "--time-limit", "120"], env=env, timeout=180)
    s = json.loads(out[out.index("{"):])
    assert (s["groups"], s["groups_finished"]) == (GROUPS, GROUPS), s

    session = Session.objects.get(pk=s["session"])
    groups = Group.objects.filter(session=session)
    assert set(groups.values_list("society", flat=True)) == {"ai_only"}
    assert set(Participant.objects.filter(session=session).values_list("kind", "controller")) == {("bot", "llm")}
    # Every turn was the model's, applied through the services; nothing timed out or fell back.
    turns = BotDecision.objects.filter(session=session)
    pitches, choices = GROUPS * ROUNDS * 2, GROUPS * ROUNDS * 2
    returns = Choice.objects.filter(group__in=groups, candidate__isnull=False).values("candidate", "round_number",
                                                                                       "group").distinct().count()
    assert turns.count() == pitches + choices + returns
    assert set(turns.values_list("status", "source")) == {("applied", "llm")}
    assert Message.objects.filter(group__in=groups, timed_out=False).count() == pitches
    assert Choice.objects.filter(group__in=groups, timed_out=False).count() == choices
    assert not Return.objects.filter(choice__group__in=groups, timed_out=True).exists()
    assert not Event.objects.filter(session=session, type="default.applied").exists()
    assert LLMCall.objects.filter(session=session, status="ok", applied=True).count() == turns.count()
    # No human-like delay: a decision is applied as soon as it is made (the profile's 5-10 s would show here).
    waits = [(t.applied_at - t.decided_at).total_seconds() for t in turns]
    assert max(waits) < 3.0, sorted(waits)[-5:]
    # The whole game took about the model's latency per phase plus the feedback phases, not the profile's delays.
    assert s["duration_s"] < 60


def test_a_thread_pool_worker_does_not_hold_a_database_connection_while_the_model_thinks(
        fake: FakeOpenAI, broker: str, procs, transactional_db: None) -> None:  # noqa: F811
    """With a pool of 2 connections, 6 turns still wait on the model together (before, at most 2 did)."""
    fake.latency = 1.5
    profile = profile_create(fake.base_url)
    experiment = factories.experiment_create(conditions=(), n_selectors=2, n_bot_selectors=2, n_candidates=6,
                                             n_bot_candidates=6, n_rounds=1, belief_rounds="", pitch_seconds=30,
                                             choice_seconds=30, return_seconds=30, feedback_seconds=1)
    Condition.objects.create(experiment=experiment, name="llm-only", society=Society.AI_ONLY, bot_profile=profile)
    env = clean_env(DJANGO_SETTINGS_MODULE="tests.bots.worker_settings", DJANGO_SECRET_KEY="x" * 60,
                    DJANGO_ALLOWED_HOSTS="127.0.0.1", DATABASE_URL=_database_url(), REDIS_URL=broker,
                    DB_POOL_MAX_SIZE="2", DB_POOL_MIN_SIZE="1", **{KEY_ENV: KEY})
    worker = procs.start("llm-threads", [PYTHON, "-m", "celery", "-A", "config", "worker", "--pool", "threads",
                                         "--concurrency", "20", "--loglevel", "INFO", "--without-mingle",
                                         "--without-gossip", "--hostname", "llmthreads@%h"], env=env)
    worker.wait_for_log(r"@\S+ ready\.", timeout=60)
    out = run_command([PYTHON, str(ROOT / "manage.py"), "society", "--experiment", experiment.slug, "--groups", "1",
                       "--seed", "2", "--json", "--time-limit", "90"], env=env, timeout=120)
    s = json.loads(out[out.index("{"):])
    assert s["groups_finished"] == 1, s
    pitches = list(LLMCall.objects.filter(session_id=s["session"], phase="pitch").values_list("created_at", "finished_at"))
    assert len(pitches) == 6
    # The most model calls in flight at one instant: each call's start, counted against the calls still open then.
    most = max(sum(1 for a, b in pitches if a <= start < b) for start, _ in pitches)
    assert most == 6, pitches
