"""Builders for test data. Everything goes through the models' defaults unless a test overrides it."""

from __future__ import annotations

import itertools
from typing import Any

from experiment.models import Condition, Experiment, Session

_n = itertools.count(1)

FAST = {"pitch_seconds": 2, "choice_seconds": 2, "return_seconds": 2, "feedback_seconds": 1, "belief_seconds": 2}


def experiment_create(*, conditions: tuple[tuple[str, bool], ...] = (("hidden", False), ("disclosed", True)),
                      **fields: Any) -> Experiment:
    n = next(_n)
    fields.setdefault("name", f"Experiment {n}")
    fields.setdefault("slug", f"experiment-{n}")
    experiment = Experiment(**fields)
    experiment.full_clean()
    experiment.save()
    for name, disclose in conditions:
        Condition.objects.create(experiment=experiment, name=name, disclose_identity=disclose)
    return experiment


def session_create(experiment: Experiment | None = None, **fields: Any) -> Session:
    return Session.objects.create(experiment=experiment or experiment_create(), **fields)


def quiz_answers(experiment: Experiment) -> dict[str, str]:
    return {str(i): q["answer"] for i, q in enumerate(experiment.quiz)}


def people_onboard(session: Session, n: int) -> list[int]:
    """Join ``n`` people and take them through consent, instructions and quiz into the lobby (via services)."""
    from experiment import services

    ids = []
    for _ in range(n):
        p = services.participant_join(session_id=session.pk)
        services.consent_submit(participant_id=p.pk, accept=True)
        services.instructions_done(participant_id=p.pk)
        services.quiz_submit(participant_id=p.pk, answers=quiz_answers(session.experiment))
        ids.append(p.pk)
    return ids


def group_start(session: Session):
    """A full group for the session's experiment, formed through the lobby. Returns the Group."""
    ids = people_onboard(session, session.experiment.n_humans)
    from experiment.models import Participant

    return Participant.objects.get(pk=ids[0]).group
