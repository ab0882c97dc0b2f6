"""The designs and sessions the browser tests play, created in the database of the server under test.

Runs inside ``manage.py shell`` against that server's SQLite file (``prepare_json`` prints one JSON line).
Phases are short enough for a test and long enough for a browser script on a busy 2-core machine; a
phase ends as soon as every seat has decided, so the deadlines only bound how long a test can hang.

Roles are assigned at random when a group forms (seeded by the session's ``seed``). Each session gets
the first seed whose seat plan gives the people, in the order they reach the lobby, the roles its test
needs, so a test knows who is a selector before anyone joins.
"""

from __future__ import annotations

import json
from typing import Any

from experiment import game
from experiment.models import Condition, Experiment, Session

COMPLETION_CODE = "E2EDONE42"

# Every design: 3 selectors and 4 candidates (2 human, 2 bot), the defaults. A phase ends when all its
# decisions are in; automated seats decide within the first 60 % of a phase, so shorter deadlines also
# make the automated seats quicker.
EXPERIMENTS: dict[str, dict[str, Any]] = {
    "e2e-two-rounds": {"n_rounds": 2, "belief_rounds": "last"},
    "e2e-one-round": {"n_rounds": 1, "belief_rounds": ""},
    # The reload test reloads twice within one choice phase: give it time on a slow machine.
    "e2e-one-round-slow-choice": {"n_rounds": 1, "belief_rounds": "", "choice_seconds": 40},
}
PHASE_SECONDS = {"pitch_seconds": 12, "choice_seconds": 20, "return_seconds": 15, "belief_seconds": 20, "feedback_seconds": 8}

# test name -> (experiment slug, roles of the people in lobby order, seconds before synthetic fill)
SESSIONS: dict[str, tuple[str, tuple[str, ...], int]] = {
    # Both people must reach the lobby within the fill window; it only delays the start by its length.
    "full_game": ("e2e-two-rounds", ("selector", "candidate"), 8),
    # Two selectors: the choice phase cannot end while the second one has not chosen, so a reload after
    # the first one's choice lands deterministically in the same phase.
    "reload": ("e2e-one-round-slow-choice", ("selector", "selector"), 8),
    "phone": ("e2e-one-round", ("selector", "candidate"), 8),
    "keyboard": ("e2e-one-round", ("selector",), 2),
}


def _experiment(slug: str, options: dict[str, Any]) -> Experiment:
    rounds = options["n_rounds"]
    experiment = Experiment.objects.create(
        name=f"Browser test ({rounds} {'round' if rounds == 1 else 'rounds'})", slug=slug,
        completion_code=COMPLETION_CODE, **{**PHASE_SECONDS, **options},
    )
    # Disclosed identities: the labels ("Human" / "AI bot") are part of what the pages must show well.
    Condition.objects.create(experiment=experiment, name="disclosed", disclose_identity=True)
    return experiment


def _group_seed(session_seed: int) -> int:
    """The first group's seed, derived as experiment.services._group_form derives it."""
    return game.rng(session_seed, "group", 1).randrange(2**31)


def _seed_for(experiment: Experiment, roles: tuple[str, ...]) -> int:
    params = experiment.params()
    for seed in range(1, 100_000):
        plan = {p.human_index: p.role for p in game.plan_seats(params.n_humans, params, _group_seed(seed)) if not p.is_bot}
        if all(plan[i] == role for i, role in enumerate(roles)):
            return seed
    raise RuntimeError(f"no session seed seats the people as {roles}")


def prepare() -> dict[str, Any]:
    experiments = {slug: _experiment(slug, options) for slug, options in EXPERIMENTS.items()}
    out: dict[str, Any] = {}
    for name, (slug, roles, fill_after) in SESSIONS.items():
        experiment = experiments[slug]
        session = Session.objects.create(experiment=experiment, label=f"e2e {name}", capacity=50,
                                         synthetic_fill_after=fill_after, seed=_seed_for(experiment, roles))
        out[name] = {
            "code": session.code, "session_id": session.pk, "roles": list(roles), "fill_after": fill_after,
            "rounds": experiment.n_rounds, "endowment": experiment.endowment, "multiplier": experiment.multiplier,
            "quiz": [{"question": q["question"], "answer": q["answer"], "options": q["options"]} for q in experiment.quiz],
        }
    return out


def prepare_json() -> None:
    print(json.dumps(prepare()))
