"""Fixtures for the LLM bot tests: a fake OpenAI-compatible server on a real socket, profiles pointing
at it, and small groups whose bot seats are played by a language model."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from bots.decisions import background
from bots.fake_openai import FakeOpenAI
from bots.models import BotProfile
from experiment.models import Condition, Experiment, Group, Participant
from tests import factories

KEY_ENV = "PARTNERLAB_TEST_LLM_KEY"
KEY = "sk-test-not-a-real-key"

# 1 human selector, 1 human candidate, 1 LLM candidate: the smallest group with an LLM seat and a choice.
TINY = {"n_selectors": 1, "n_bot_selectors": 0, "n_candidates": 2, "n_bot_candidates": 1, "n_rounds": 2,
        "belief_rounds": "", "pitch_seconds": 60, "choice_seconds": 60, "return_seconds": 60,
        "feedback_seconds": 5, "belief_seconds": 60}


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture(autouse=True)
def _llm_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


@pytest.fixture(autouse=True)
def _background_idle() -> Iterator[None]:
    yield
    # No turn of one test may write into the next test's database.
    assert background.wait_idle(30), "LLM turns still running after the test"


def profile_create(base_url: str, **fields: Any) -> BotProfile:
    values: dict[str, Any] = {"name": f"profile {BotProfile.objects.count() + 1}", "base_url": base_url,
                              "api_key_env": KEY_ENV, "model": "fake-model", "delay_min": 0.5, "delay_max": 1.0,
                              "typing_cps": 1000.0, "timeout_seconds": 5.0, "max_retries": 2,
                              "price_input_per_1k": "0.150000", "price_output_per_1k": "0.600000"}
    values.update(fields)
    profile = BotProfile(**values)
    profile.full_clean()
    profile.save()
    return profile


@pytest.fixture
def profile(fake: FakeOpenAI, db: None) -> BotProfile:
    return profile_create(fake.base_url)


def experiment_with(profile: BotProfile | None, *, disclose: bool = True, **fields: Any) -> Experiment:
    experiment = factories.experiment_create(conditions=(("disclosed" if disclose else "hidden", disclose),),
                                             **{**TINY, **fields})
    Condition.objects.filter(experiment=experiment).update(bot_profile=profile)
    return experiment


def group_with(profile: BotProfile | None, **fields: Any) -> Group:
    session = factories.session_create(experiment_with(profile, **fields), capacity=50)
    return factories.group_start(session)


def seat_of(group: Group, *, controller: str | None = None, role: str | None = None, kind: str | None = None) -> Participant:
    rows = Participant.objects.filter(group=group).order_by("seat")
    if controller:
        rows = rows.filter(controller=controller)
    if role:
        rows = rows.filter(role=role)
    if kind:
        rows = rows.filter(kind=kind)
    return rows.first()
