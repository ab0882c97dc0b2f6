"""A session's design is frozen when it admits its first participant, and the export ships it with its hash."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
from django.apps import apps
from django.core.management import call_command

from experiment import design, export, services
from experiment.models import Condition, Experiment, Session
from tests import factories

pytestmark = pytest.mark.django_db


def test_the_first_join_freezes_the_design_and_later_edits_do_not_reach_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARTNERLAB_TEST_KEY", "sk-do-not-store-me")
    profile = apps.get_model("bots", "BotProfile").objects.create(name="frozen profile", model="m-1",
                                                                   api_key_env="PARTNERLAB_TEST_KEY")
    experiment = factories.experiment_create(n_rounds=4)
    Condition.objects.filter(experiment=experiment, name="disclosed").update(bot_profile=profile)
    session = factories.session_create(experiment)
    assert session.design is None and session.design_frozen_at is None
    before = design.snapshot(experiment)

    services.participant_join(session_id=session.pk)
    session.refresh_from_db()
    assert session.design == before and session.design_frozen_at is not None
    assert session.design["experiment"]["n_rounds"] == 4
    hidden, disclosed = session.design["conditions"]
    assert (hidden["name"], hidden["bot_profile"]) == ("hidden", None)
    assert disclosed["bot_profile"]["model"] == "m-1" and disclosed["bot_profile"]["api_key_env"] == "PARTNERLAB_TEST_KEY"
    assert "sk-do-not-store-me" not in json.dumps(session.design)
    frozen_at, digest = session.design_frozen_at, design.digest(session.design)

    # An edit outside the admin's lock (a shell, the API), of the experiment or of the profile, after the start.
    Experiment.objects.filter(pk=experiment.pk).update(n_rounds=9)
    type(profile).objects.filter(pk=profile.pk).update(model="m-2")
    services.participant_join(session_id=session.pk)
    session.refresh_from_db()
    assert session.design_frozen_at == frozen_at and design.digest(session.design) == digest
    assert design.snapshot(Experiment.objects.get(pk=experiment.pk)) != session.design


def test_a_group_formed_without_a_join_freezes_it_too() -> None:
    """Simulations and synthetic fills form groups from the lobby; the design is frozen by then at the latest."""
    session = factories.session_create()
    Session.objects.filter(pk=session.pk).update(design=None)
    locked = Session.objects.select_related("experiment").get(pk=session.pk)
    services._group_form(locked, [], locked.experiment.params(), locked.created_at,
                         conditions=list(locked.experiment.conditions.all()))
    session.refresh_from_db()
    assert session.design == design.snapshot(session.experiment)


def test_the_digest_is_of_canonical_json() -> None:
    a = {"experiment": {"n_rounds": 3, "name": "é"}, "conditions": [{"name": "x"}]}
    b = {"conditions": [{"name": "x"}], "experiment": {"name": "é", "n_rounds": 3}}
    assert design.digest(a) == design.digest(b) and len(design.digest(a)) == 64
    assert design.digest(a) != design.digest({**a, "experiment": {"n_rounds": 4, "name": "é"}})


def test_the_bundle_ships_each_sessions_frozen_design_and_its_hash(tmp_path: Path) -> None:
    experiment = factories.experiment_create(n_rounds=3)
    played, idle = factories.session_create(experiment), factories.session_create(experiment)
    services.participant_join(session_id=played.pk)
    played.refresh_from_db()
    Experiment.objects.filter(pk=experiment.pk).update(n_rounds=7)  # after the start: not the design that ran

    call_command("export", experiment=experiment.slug, out=tmp_path, stdout=io.StringIO())
    (bundle,) = tmp_path.iterdir()
    with zipfile.ZipFile(bundle) as z:
        designs = json.loads(z.read(export.DESIGNS))
        manifest = json.loads(z.read(export.MANIFEST))
    by_session = {d["session_id"]: d for d in designs}
    assert set(by_session) == {played.pk, idle.pk}
    shipped = by_session[played.pk]
    assert shipped["design"]["experiment"]["n_rounds"] == 3 and shipped["sha256"] == design.digest(played.design)
    assert shipped["frozen_at"] == played.design_frozen_at.isoformat() and shipped["experiment"] == experiment.slug
    assert by_session[idle.pk]["design"] is None and by_session[idle.pk]["sha256"] is None
    assert manifest["designs"] == {str(played.pk): shipped["sha256"], str(idle.pk): None}
    assert export.DESIGNS in manifest["files"]
