"""The bot admin: profiles with their "test this profile" button, the read-only call log and its totals."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import reverse

from bots.fake_openai import FakeOpenAI, Reply
from bots.models import BotProfile, LLMCall
from tests.bots.conftest import group_with, profile_create, seat_of

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff(client: Client) -> Client:
    user = get_user_model().objects.create_superuser("boss", "boss@example.org", "pw-long-enough-1")
    client.force_login(user)
    return client


def test_a_new_profile_has_the_documented_defaults(staff: Client) -> None:
    page = staff.get(reverse("admin:bots_botprofile_add")).content.decode()
    assert "https://api.openai.com/v1" in page and "OPENAI_API_KEY" in page and "warm, honest and cooperative" in page
    response = staff.post(reverse("admin:bots_botprofile_add"), {
        "name": "bad", "base_url": "https://api.openai.com/v1", "api_key_env": "sk-abc123 secret", "requires_key": "on",
        "model": "gpt-4o-mini", "temperature": "1.0", "max_tokens": "400", "max_tokens_param": "max_completion_tokens",
        "response_format": "json_schema", "system_prompt": "Be kind.", "delay_min": "9", "delay_max": "3", "typing_cps": "8",
        "price_input_per_1k": "0", "price_output_per_1k": "0", "fallback": "scripted", "timeout_seconds": "20",
        "max_retries": "2"})
    assert response.status_code == 200  # refused, with the reasons
    text = response.content.decode()
    assert "not the key itself" in text and "must not be shorter than the shortest delay" in text
    assert not BotProfile.objects.exists()


def test_the_test_button_shows_reply_latency_and_cost(staff: Client, fake: FakeOpenAI) -> None:
    profile = profile_create(fake.base_url, price_input_per_1k="1.000000", price_output_per_1k="2.000000")
    change = staff.get(reverse("admin:bots_botprofile_change", args=[profile.pk])).content.decode()
    test_url = reverse("admin:bots_botprofile_test", args=[profile.pk])
    assert test_url in change and "Test this profile" in change and "Language model (key found)" in change
    assert staff.get(test_url).status_code == 200 and not fake.requests  # only a POST sends a request
    fake.script(Reply.json({"message": "Pick me, I share."}, prompt_tokens=1000, completion_tokens=500))
    page = staff.post(test_url).content.decode()
    assert "It works" in page and "Pick me, I share." in page and "$2.000000" in page and " ms" in page
    call = LLMCall.objects.get()
    assert (call.purpose, call.status, call.profile, call.cost, call.participant) == (
        "profile_test", "ok", profile, Decimal("2.000000"), None)
    assert fake.requests[0]["messages"][0]["content"].startswith(profile.system_prompt)


@pytest.mark.parametrize(("reply", "words"), [
    (Reply.error(401, message="Incorrect API key provided"), "refused the API key"),
    (Reply.error(404, message="The model does not exist"), "check the model name and base URL"),
    (Reply.text("I will write a nice pitch!"), "cannot be used as a game move"),
    (Reply.hang_up(), "Is the server running and the base URL right?"),
])
def test_the_test_button_explains_failures_in_plain_words(staff: Client, fake: FakeOpenAI, reply: Reply, words: str) -> None:
    profile = profile_create(fake.base_url)
    fake.script(reply)
    page = staff.post(reverse("admin:bots_botprofile_test", args=[profile.pk])).content.decode()
    assert "It does not work yet" in page and words in page
    assert LLMCall.objects.get().status in ("error", "invalid")


def test_a_missing_key_is_named(staff: Client, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    profile = profile_create(fake.base_url, api_key_env="PARTNERLAB_TEST_NO_SUCH_KEY")
    monkeypatch.delenv("PARTNERLAB_TEST_NO_SUCH_KEY", raising=False)
    listing = staff.get(reverse("admin:bots_botprofile_changelist")).content.decode()
    assert "Offline scripted bot: the environment variable PARTNERLAB_TEST_NO_SUCH_KEY is not set" in listing
    page = staff.post(reverse("admin:bots_botprofile_test", args=[profile.pk])).content.decode()
    assert "PARTNERLAB_TEST_NO_SUCH_KEY" in page and "offline scripted bot" in page and not fake.requests


def test_the_bulk_action_tests_profiles(staff: Client, fake: FakeOpenAI) -> None:
    profile = profile_create(fake.base_url)
    response = staff.post(reverse("admin:bots_botprofile_changelist"),
                          {"action": "test_profiles", "_selected_action": [profile.pk]}, follow=True)
    assert "answered in" in response.content.decode() and len(fake.requests) == 1


def test_the_call_log_is_read_only_and_totals_a_session(staff: Client, fake: FakeOpenAI, profile: BotProfile) -> None:
    from bots import decisions

    group = group_with(profile)
    bot = seat_of(group, kind="bot")
    fake.script(Reply.text("oops", prompt_tokens=1000, completion_tokens=100),
                Reply.json({"message": "ok now"}, prompt_tokens=2000, completion_tokens=100))
    assert decisions.decide_now(participant_id=bot.pk, round_number=1, phase="pitch") is None
    other = profile_create(fake.base_url, name="elsewhere")
    LLMCall.objects.create(profile=other, model="x", tokens_in=99999, cost=Decimal("9"), status="ok")  # not this session
    listing = staff.get(reverse("admin:bots_llmcall_changelist") + f"?session__id__exact={group.session_id}").content.decode()
    # 3000 × 0.15/1k + 200 × 0.60/1k
    assert "Shown calls:</strong> 2" in listing and "3000 in, 200 out" in listing and "$0.570000" in listing
    call = LLMCall.objects.filter(session=group.session).first()
    detail = staff.get(reverse("admin:bots_llmcall_change", args=[call.pk]))
    assert detail.status_code == 200 and "Save" not in detail.content.decode()
    assert staff.post(reverse("admin:bots_llmcall_change", args=[call.pk]), {"raw_reply": "edited"}).status_code == 403
    assert staff.get(reverse("admin:bots_llmcall_add")).status_code == 403
    decisions_page = staff.get(reverse("admin:bots_botdecision_changelist")).content.decode()
    assert "?decision__id__exact=" in decisions_page
    spend = staff.get(reverse("cockpit:spend", args=[group.session_id])).content.decode()
    assert "0.570000" in spend and profile.name in spend
