"""The staff REST API: who may read, what they get (never a participant token), filters, pages, schema."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from rest_framework.authtoken.models import Token

from bots.models import LLMCall
from experiment import services
from experiment.models import Choice, Message, Participant, Session
from tests import factories
from tests.experiment import playthrough

pytestmark = pytest.mark.django_db

LISTS = ["experiments", "sessions", "groups", "participants", "choices", "messages", "llm-calls"]


@pytest.fixture
def played() -> Session:
    session = playthrough.session_played()
    bot = session.participants.filter(kind="bot").first()
    LLMCall.objects.create(participant=bot, group=bot.group, session=session, round_number=1, phase="pitch",
                           model="gpt-test", status="ok", tokens_in=10, tokens_out=5)
    return session


@pytest.fixture
def other() -> Session:
    """A second experiment's session with two people who joined, to see that filters filter."""
    session = factories.session_create(factories.experiment_create(slug="other-study"))
    services.participant_join(session_id=session.pk, prolific_pid="OTHER1")
    services.participant_join(session_id=session.pk, prolific_pid="OTHER2")
    return session


@pytest.fixture
def staff() -> Client:
    client = Client()
    client.force_login(get_user_model().objects.create_user("analyst", password="pw-analyst-123", is_staff=True))
    return client


def test_anonymous_and_participants_are_refused(played: Session) -> None:
    seat = played.participants.filter(controller="person").first()
    participant = Client()
    assert participant.get(f"/play/{seat.token}/").status_code == 200  # a real participant browser
    plain_user = Client()
    plain_user.force_login(get_user_model().objects.create_user("player", password="pw-player-123"))
    for name in LISTS:
        url = f"/api/{name}/"
        assert Client().get(url).status_code in (401, 403), url
        assert participant.get(url).status_code in (401, 403), url
        # A participant token is no API token (403 rather than 401: session auth comes first and sends no challenge).
        refused = Client().get(url, HTTP_AUTHORIZATION=f"Token {seat.token}")
        assert refused.status_code in (401, 403) and refused.json() == {"detail": "Invalid token."}, url
        assert plain_user.get(url).status_code == 403, url
    for url in ("/api/schema/", f"/api/sessions/{played.pk}/export/", f"/api/sessions/{played.pk}/"):
        assert Client().get(url).status_code in (401, 403), url
        assert participant.get(url).status_code in (401, 403), url


def test_staff_get_data_by_session_or_token(played: Session, other: Session, staff: Client) -> None:
    for name in LISTS:
        response = staff.get(f"/api/{name}/")
        assert response.status_code == 200, name
        assert response.json()["count"] >= 1
    token = Token.objects.create(user=get_user_model().objects.create_user("robot", password="pw-robot-123", is_staff=True))
    response = Client().get("/api/choices/", {"session": played.pk}, HTTP_AUTHORIZATION=f"Token {token.key}")
    assert response.status_code == 200 and response.json()["count"] == Choice.objects.filter(group__session=played).count()

    body = staff.get("/api/choices/", {"session": played.pk, "page_size": 1000}).json()
    stored = {c.pk: c for c in Choice.objects.filter(group__session=played).select_related("candidate", "selector",
                                                                                           "return_decision")}
    assert {r["id"] for r in body["results"]} == set(stored)
    for row in body["results"]:
        c = stored[row["id"]]
        assert (row["session"], row["selector"], row["selector_seat"], row["candidate_seat"], row["candidate_kind"],
                row["sent"], row["multiplied"], row["returned"], row["order"], row["label_shown"]) == \
               (played.pk, c.selector_id, c.selector.seat, c.candidate.seat, c.candidate.kind, c.sent, c.multiplied,
                c.return_decision.returned, c.order, c.label_shown)

    body = staff.get("/api/messages/", {"session": played.pk, "page_size": 1000}).json()
    assert body["count"] == Message.objects.filter(group__session=played).count()
    assert all(r["length"] == len(r["text"]) for r in body["results"])

    experiment = staff.get(f"/api/experiments/{played.experiment.slug}/").json()
    assert {c["name"] for c in experiment["conditions"]} == {"hidden", "disclosed"}
    session = staff.get(f"/api/sessions/{played.pk}/").json()
    assert (session["experiment"], session["n_groups"]) == (played.experiment.slug, 2)
    calls = staff.get("/api/llm-calls/", {"session": played.pk}).json()
    assert calls["count"] == 1 and calls["results"][0]["tokens_in"] == 10


def test_filters_and_pages(played: Session, other: Session, staff: Client) -> None:
    participants = staff.get("/api/participants/", {"experiment": "other-study"}).json()
    assert participants["count"] == 2 and {r["prolific_pid"] for r in participants["results"]} == {"OTHER1", "OTHER2"}
    assert staff.get("/api/participants/", {"session": other.pk}).json()["count"] == 2
    assert staff.get("/api/participants/", {"session": played.pk}).json()["count"] == played.participants.count()
    assert staff.get("/api/sessions/", {"experiment": "other-study"}).json()["count"] == 1
    assert staff.get("/api/experiments/", {"session": other.pk}).json()["results"][0]["slug"] == "other-study"
    assert staff.get("/api/choices/", {"experiment": "other-study"}).json()["count"] == 0
    assert staff.get("/api/groups/", {"session": played.pk}).json()["count"] == 2
    bad = staff.get("/api/choices/", {"session": "abc"})
    assert bad.status_code == 400 and "session" in bad.json()

    total = Choice.objects.filter(group__session=played).count()
    first = staff.get("/api/choices/", {"session": played.pk, "page_size": 5}).json()
    assert first["count"] == total and len(first["results"]) == 5 and first["next"]
    second = staff.get(first["next"]).json()
    assert not {r["id"] for r in first["results"]} & {r["id"] for r in second["results"]}
    assert len(staff.get("/api/choices/", {"page_size": 100000}).json()["results"]) <= 1000


def test_no_response_ever_holds_a_participant_token(played: Session, staff: Client) -> None:
    tokens = set(Participant.objects.values_list("token", flat=True))
    bodies = []
    for name in LISTS:
        body = staff.get(f"/api/{name}/", {"page_size": 1000}).content.decode()
        bodies.append(body)
        assert '"token"' not in body
    p = played.participants.first()
    bodies.append(staff.get(f"/api/participants/{p.pk}/").content.decode())
    everything = "\n".join(bodies)
    assert not [t for t in tokens if t in everything]


def test_bundle_through_the_api(played: Session, staff: Client) -> None:
    response = staff.get(f"/api/sessions/{played.pk}/export/", {"file_format": "jsonl", "pseudonymise": "true"})
    assert response.status_code == 200 and response["Content-Type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content))) as z:
        assert "choices.jsonl" in z.namelist()
        data = b"".join(z.read(n) for n in z.namelist())
    assert not [pid for pid in played.participants.exclude(prolific_pid="").values_list("prolific_pid", flat=True)
                if pid.encode() in data]
    response = staff.get(f"/api/experiments/{played.experiment.slug}/export/")
    assert response.status_code == 200 and response.streaming
    assert staff.get(f"/api/sessions/{played.pk}/export/", {"file_format": "xlsx"}).status_code == 400
    assert staff.get("/api/sessions/999999/export/").status_code == 404


def test_schema_validates_and_docs_render(played: Session, staff: Client) -> None:
    from openapi_spec_validator import validate

    response = staff.get("/api/schema/", {"format": "json"})
    assert response.status_code == 200
    schema = json.loads(response.content)
    validate(schema)  # raises on an invalid OpenAPI document
    paths = schema["paths"]
    for name in LISTS:
        assert f"/api/{name}/" in paths
        params = {p["name"] for p in paths[f"/api/{name}/"]["get"]["parameters"]}
        assert {"session", "experiment", "page", "page_size"} <= params, name
    assert "/api/sessions/{id}/export/" in paths and "/api/experiments/{slug}/export/" in paths
    participant = schema["components"]["schemas"]["Participant"]["properties"]
    assert "token" not in participant and "prolific_pid" in participant
    assert {"cookieAuth", "tokenAuth"} <= set(schema["components"]["securitySchemes"])
    docs = staff.get("/api/docs/")
    assert docs.status_code == 200 and b"swagger" in docs.content.lower()


def test_api_docs_page_uses_local_assets_only(admin_client) -> None:
    page = admin_client.get("/api/docs/").content.decode()
    assert "swagger-ui" in page
    assert "cdn." not in page and "unpkg" not in page, "the docs must not depend on a CDN"
