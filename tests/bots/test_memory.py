"""Memory arms: what of the earlier rounds a bot's prompt shows (none, its own, the group's), bounded by the
profile's ``memory_rounds`` and recorded with every turn. Prompts are read from the requests the fake
OpenAI-compatible server received, so what is checked is what a model would have been sent."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.core.exceptions import ValidationError

from bots import prompts
from bots.fake_openai import FakeOpenAI, Reply
from bots.models import BotDecision, BotProfile, LLMCall
from bots.prompts import DATA_CLOSE, DATA_OPEN
from experiment import export, services
from experiment.export import Options, Scope
from experiment.models import Participant
from tests.bots.conftest import group_with, profile_create, seat_of
from tests.bots.test_prompts import NOW, candidate_state, selector_state
from tests.bots.test_turns import deadline_pass, fresh, to_return_phase, turn

P = Participant


def sent_data(fake: FakeOpenAI, index: int = -1) -> dict[str, Any]:
    """The game data of a request the model received, parsed back from its user message."""
    content = fake.requests[index]["messages"][1]["content"]
    return json.loads(content.split(DATA_OPEN, 1)[1].split(DATA_CLOSE, 1)[0])


def table_rows(name: str, session_id: int) -> list[dict[str, Any]]:
    t, options = export.table(name), Options()
    names = [c.name for c in export.columns_of(t, options)]
    return [dict(zip(names, row, strict=True)) for row in export.rows(t, scope=Scope.session(session_id), options=options)]


def play_round(fake: FakeOpenAI, group: Any, bot: Participant, *, sent: int, returned: int) -> None:
    """One whole round: the human candidate and the bot pitch, the human selector sends to the bot, the bot
    returns, the feedback phase ends."""
    fake.script(Reply.json({"message": f"round {fresh(group).round_number}: I return half"}))
    to_return_phase(group, bot, sent=sent)
    fake.script(Reply.json({"returns": {"S1": returned}}))
    assert turn(bot).status == BotDecision.Status.APPLIED
    deadline_pass(group)


# ---- the prompt, pure -------------------------------------------------------------------------------------

def test_no_memory_drops_every_trace_of_earlier_rounds() -> None:
    selector = prompts.game_data(selector_state(), [], NOW, memory="none")
    assert all("your_history_with_them" not in card for card in selector["candidates"])
    assert [card["message"] for card in selector["candidates"]] == ["I return half, always.", "Trust me!"]
    past = [{"round": 1, "your_message": "hi", "chosen_by": [], "you_earned": 0}]
    candidate = prompts.game_data(candidate_state(), past, NOW, memory="none")
    assert "your_past_rounds" not in candidate and candidate["to_return"]  # the current round stays whole
    assert "group_history" not in selector and "group_history" not in candidate


def test_own_memory_is_what_the_seat_saw_and_group_memory_adds_the_group() -> None:
    past = [{"round": 1, "your_message": "hi", "chosen_by": [], "you_earned": 0}]
    own = prompts.game_data(candidate_state(), past, NOW, memory="own")
    assert own == prompts.game_data(candidate_state(), past, NOW) and own["your_past_rounds"] == past
    shared = [{"round": 1, "messages": [], "choices": [{"selector": "Selector 1", "chose": None, "sent": 0, "returned": None}]}]
    group = prompts.game_data(candidate_state(), past, NOW, memory="group", group_history=shared)
    assert group == {**own, "group_history": shared} and list(group)[-1] == "group_history"
    card = prompts.game_data(selector_state(), [], NOW, memory="group", group_history=[])["candidates"][0]
    assert card["your_history_with_them"] == {"rounds_you_chose_them": [1], "you_sent": 5, "they_returned": 7}


def test_an_unknown_memory_arm_is_an_error_not_a_silent_default() -> None:
    with pytest.raises(ValueError, match="unknown memory arm"):
        prompts.game_data(selector_state(), [], NOW, memory="everything")


@pytest.mark.django_db
@pytest.mark.parametrize(("fields", "bad"), [
    ({"memory": "everything"}, "memory"), ({"memory": ""}, "memory"), ({"memory": "x" * 5000}, "memory"),
    ({"memory_rounds": 0}, "memory_rounds"), ({"memory_rounds": 201}, "memory_rounds"),
])
def test_a_profile_with_a_bad_memory_arm_is_refused_and_not_stored(fields: dict[str, Any], bad: str) -> None:
    with pytest.raises(ValidationError) as info:
        profile_create("http://127.0.0.1:9/v1", **fields)
    assert bad in info.value.message_dict
    assert not BotProfile.objects.exists()


# ---- whole turns, through the real client and the fake server ---------------------------------------------

@pytest.mark.django_db
def test_group_memory_shows_the_whole_group_history_and_never_the_current_round(fake: FakeOpenAI) -> None:
    profile = profile_create(fake.base_url, memory="group")
    group = group_with(profile)
    bot = seat_of(group, kind="bot")
    human = seat_of(group, controller="person", role="candidate")
    play_round(fake, group, bot, sent=6, returned=10)

    fake.script(Reply.json({"message": "round 2: still half"}))
    turn(bot)  # round 2's pitch
    data = sent_data(fake)
    round_1 = {"round": 1,
               "messages": sorted([{"candidate": human.public_name, "message": "hi, pick me"},
                                   {"candidate": bot.public_name, "message": "round 1: I return half"}],
                                  key=lambda m: m["candidate"]),
               "choices": [{"selector": "Selector 1", "chose": bot.public_name, "sent": 6, "returned": 10}]}
    assert data["group_history"] == [round_1]
    assert data["your_past_rounds"][0]["round"] == 1  # its own rounds stay, as under `own`
    d = BotDecision.objects.get(participant=bot, round_number=2, phase="pitch")
    assert (d.memory, d.memory_rounds) == ("group", 10)

    # Round 2's return: this round's pitches and choice are in the seat's own view, never in the history.
    selector = seat_of(group, role="selector", controller="person")
    services.pitch_submit(participant_id=human.pk, round_number=2, text="round 2 human")
    services.choice_submit(participant_id=selector.pk, round_number=2, candidate=bot.seat, amount=4)
    fake.script(Reply.json({"returns": {"S1": 3}}))
    turn(bot)
    assert [r["round"] for r in sent_data(fake)["group_history"]] == [1]

    # Recorded with every call, in the export.
    rows = {r["llm_call_id"]: r for r in table_rows("llm_calls", group.session_id)}
    for call in LLMCall.objects.filter(participant=bot):
        assert (rows[call.pk]["memory"], rows[call.pk]["memory_rounds"]) == ("group", 10)
    (seat,) = [r for r in table_rows("participants", group.session_id) if r["participant_id"] == bot.pk]
    assert seat["bot_memory"] == "group"


@pytest.mark.django_db
def test_memory_rounds_bounds_the_prompt_to_the_latest_rounds(fake: FakeOpenAI) -> None:
    profile = profile_create(fake.base_url, memory="group", memory_rounds=1)
    group = group_with(profile, n_rounds=3)
    bot = seat_of(group, kind="bot")
    play_round(fake, group, bot, sent=6, returned=10)
    play_round(fake, group, bot, sent=2, returned=1)
    fake.script(Reply.json({"message": "round 3"}))
    turn(bot)
    data = sent_data(fake)
    assert [r["round"] for r in data["group_history"]] == [2]
    assert data["group_history"][0]["choices"][0]["sent"] == 2
    assert [r["round"] for r in data["your_past_rounds"]] == [2]


@pytest.mark.django_db
def test_no_memory_sends_no_past_rounds_and_records_the_arm(fake: FakeOpenAI) -> None:
    profile = profile_create(fake.base_url, memory="none")
    group = group_with(profile)
    bot = seat_of(group, kind="bot")
    play_round(fake, group, bot, sent=6, returned=10)
    fake.script(Reply.json({"message": "round 2"}))
    turn(bot)
    data = sent_data(fake)
    assert "your_past_rounds" not in data and "group_history" not in data
    assert "round 1: I return half" not in fake.requests[-1]["messages"][1]["content"]
    assert set(BotDecision.objects.filter(participant=bot).values_list("memory", flat=True)) == {"none"}


@pytest.mark.django_db
def test_own_memory_is_the_default_and_unchanged(fake: FakeOpenAI, profile: BotProfile) -> None:
    assert (profile.memory, profile.memory_rounds) == ("own", 10)
    group = group_with(profile)
    bot = seat_of(group, kind="bot")
    play_round(fake, group, bot, sent=6, returned=10)
    turn(bot)
    data = sent_data(fake)
    assert "group_history" not in data
    assert data["your_past_rounds"][0]["chosen_by"] == [{"selector": "Selector 1", "sent": 6, "you_received": 18,
                                                        "you_returned": 10}]
