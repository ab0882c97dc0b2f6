"""Plays whole games through the services (no websockets, no waiting): the data tests' source of truth.

Humans act through the same service calls the consumer makes; bot seats act through
``bots.automation.seat_act`` (their scheduled job), called at once instead of after a human-like delay.
"""

from __future__ import annotations

from typing import Any

from bots import automation
from experiment import services
from experiment.models import Choice, Experiment, Group, Participant, Session
from tests import factories

P = Participant
ROUNDS = 3
ANSWERS = {"age": 31, "gender": "female", "ai_attitude": 5, "suspected_bots": "yes", "comments": "fine, thanks"}


def experiment_two_arms(**fields: Any) -> Experiment:
    fields = {"n_rounds": ROUNDS, "belief_rounds": "last", **fields}
    return factories.experiment_create(conditions=(("hidden", False), ("disclosed", True)), **fields)


def people_join(session: Session, n: int, *, prefix: str) -> list[Participant]:
    """``n`` people with recruitment ids, through consent, instructions and quiz (a group forms when enough wait)."""
    people = []
    for i in range(n):
        p = services.participant_join(session_id=session.pk, prolific_pid=f"{prefix}{i:03d}", study_id="STUDY1",
                                      recruitment_session_id=f"SUB{prefix}{i:03d}")
        services.consent_submit(participant_id=p.pk, accept=True)
        services.instructions_done(participant_id=p.pk)
        services.quiz_submit(participant_id=p.pk, answers=factories.quiz_answers(session.experiment))
        people.append(p)
    return people


def _bots_act(group: Group, role: str) -> None:
    for p in group.participants.filter(role=role).exclude(controller=P.Controller.PERSON).order_by("seat"):
        automation.seat_act(participant_id=p.pk, round_number=group.round_number, phase=group.phase)


def play(group: Group, *, until: tuple[int, str] | None = None) -> None:
    """Play the group to its end (or stop when it reaches ``until`` = (round, phase)).

    Deterministic human decisions: selector i chooses the candidate at list position (i + r) and sends
    (i + 2r) mod (E + 1); human candidates return half of what they received, rounded down.
    """
    while True:
        group.refresh_from_db()
        if group.status != Group.Status.PLAYING or (group.round_number, group.phase) == until:
            return
        r, phase = group.round_number, group.phase
        people = list(group.participants.filter(controller=P.Controller.PERSON).order_by("seat"))
        if phase == "pitch":
            for p in people:
                if p.role == P.Role.CANDIDATE:
                    services.pitch_submit(participant_id=p.pk, round_number=r, text=f"Round {r}: trust {p.seat}, \"ok\"?")
            _bots_act(group, P.Role.CANDIDATE)
        elif phase == "choice":
            candidates = sorted(group.participants.filter(role=P.Role.CANDIDATE).values_list("seat", flat=True))
            endowment = group.session.experiment.endowment
            for i, p in enumerate(x for x in people if x.role == P.Role.SELECTOR):
                services.choice_submit(participant_id=p.pk, round_number=r, candidate=candidates[(i + r) % len(candidates)],
                                       amount=(i + 2 * r) % (endowment + 1))
            _bots_act(group, P.Role.SELECTOR)
        elif phase == "return":
            for choice in Choice.objects.filter(group=group, round_number=r, candidate__controller=P.Controller.PERSON,
                                                return_decision__isnull=True).select_related("candidate", "selector"):
                services.return_submit(participant_id=choice.candidate_id, round_number=r, selector=choice.selector.seat,
                                       amount=choice.multiplied // 2)
            _bots_act(group, P.Role.CANDIDATE)
        elif phase == "belief":
            candidates = list(group.participants.filter(role=P.Role.CANDIDATE).order_by("seat"))
            for i, p in enumerate(x for x in people if x.role == P.Role.SELECTOR):
                beliefs = {c.seat: {"guess": "bot" if (i + j) % 2 else "human", "confidence": 50 + 10 * j}
                           for j, c in enumerate(candidates)}
                services.belief_submit(participant_id=p.pk, round_number=r, beliefs=beliefs)
            _bots_act(group, P.Role.SELECTOR)
        else:  # feedback: nobody acts, the phase only runs its time
            services.phase_close(group_id=group.pk, round_number=r, phase=phase, reason="staff")
        group.refresh_from_db()
        if (group.round_number, group.phase) == (r, phase) and group.status == Group.Status.PLAYING:
            raise AssertionError(f"group {group.pk} is stuck in round {r} {phase}")


def questionnaires_submit(group: Group) -> None:
    for p in group.participants.filter(controller=P.Controller.PERSON, status=P.Status.QUESTIONNAIRE):
        services.questionnaire_submit(participant_id=p.pk, answers=ANSWERS)


def session_played(*, until_second: tuple[int, str] | None = None, **fields: Any) -> Session:
    """One session of an experiment with both arms and two groups: one per condition, played to the end
    (the second one stops at ``until_second`` when given, as in a running session). One extra person
    declines consent, one is left waiting in the lobby."""
    experiment = experiment_two_arms(**fields)
    session = factories.session_create(experiment, capacity=20)
    first = people_join(session, experiment.n_humans, prefix="PA")
    second = people_join(session, experiment.n_humans, prefix="PB")
    for people in (first, second):
        people[0].refresh_from_db()
    g1, g2 = first[0].group, second[0].group
    assert g1 is not None and g2 is not None and g1.condition_id != g2.condition_id
    play(g1)
    questionnaires_submit(g1)
    play(g2, until=until_second)
    questionnaires_submit(g2)
    declined = services.participant_join(session_id=session.pk, prolific_pid="PDECLINE")
    services.consent_submit(participant_id=declined.pk, accept=False)
    people_join(session, 1, prefix="PWAIT")
    return session
