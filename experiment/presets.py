"""Ready-made designs and copies of designs: an experimenter starts from one, then edits.

A preset is plain data: the experiment fields that differ from the model defaults (which are the DESIGN.md
defaults, so most presets list none) and its conditions. Everything created here passes the same design
check as a design entered by hand.
"""

from __future__ import annotations

from typing import Any, TypedDict

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils.text import slugify

from experiment import game
from experiment.game import RuleError
from experiment.models import Condition, Experiment


class ConditionData(TypedDict, total=False):
    name: str
    disclose_identity: bool
    disclose_from_round: int
    society: str


class Preset(TypedDict):
    label: str
    description: str
    fields: dict[str, Any]
    conditions: list[ConditionData]


HIDDEN: ConditionData = {"name": "hidden", "disclose_identity": False, "disclose_from_round": 1}
DISCLOSED: ConditionData = {"name": "disclosed", "disclose_identity": True, "disclose_from_round": 1}

PRESETS: dict[str, Preset] = {
    "disclosed": {
        "label": "Disclosed identity",
        "description": "One arm: selectors see a Human / AI bot label on every candidate from round 1.",
        "fields": {},
        "conditions": [DISCLOSED],
    },
    "hidden": {
        "label": "Hidden identity",
        "description": "One arm: no identity labels, so selectors cannot tell who is a bot.",
        "fields": {},
        "conditions": [HIDDEN],
    },
    "hidden-vs-disclosed": {
        "label": "Hidden vs disclosed (two arms)",
        "description": "Two arms, balanced across groups: hidden labels and disclosed labels.",
        "fields": {},
        "conditions": [HIDDEN, DISCLOSED],
    },
    "hybrid-vs-ai-only": {
        "label": "Hybrid vs AI-only societies",
        "description": "Two arms with hidden labels and the same seats: people and bots in the hybrid groups (formed "
                       "in the lobby), a bot in every seat of the AI-only groups (started by staff: cockpit or "
                       "manage.py society). One analysis compares them.",
        "fields": {},
        "conditions": [HIDDEN, {"name": "ai-only", "disclose_identity": False, "disclose_from_round": 1,
                                "society": "ai_only"}],
    },
    "ai-only": {
        "label": "AI-only society",
        "description": "Every seat a bot: groups are started by staff (cockpit or manage.py society), nobody joins.",
        "fields": {"n_bot_selectors": 3, "n_bot_candidates": 4},
        "conditions": [{"name": "ai-only", "disclose_identity": False, "disclose_from_round": 1, "society": "ai_only"}],
    },
}

# Fields that identify a design rather than describe it: never copied.
_NOT_COPIED = {"id", "slug", "name", "created_at"}


def experiment_create_from_preset(*, preset: str, name: str | None = None) -> Experiment:
    """A new experiment with the preset's design and conditions, under a fresh unique slug."""
    if preset not in PRESETS:
        raise RuleError("unknown_preset", f'There is no preset "{preset}"; choose one of: {", ".join(PRESETS)}.')
    data = PRESETS[preset]
    name = (name or "").strip() or data["label"]
    with transaction.atomic():
        experiment = Experiment(name=name, slug=_unique_slug(name), **data["fields"])
        experiment.full_clean()
        experiment.save()
        _conditions_create(experiment, [dict(c) for c in data["conditions"]])
    return experiment


def experiment_duplicate(*, experiment_id: int, name: str | None = None) -> Experiment:
    """A copy of the design and its conditions (no sessions, no data) under a new unique slug."""
    with transaction.atomic():
        original = Experiment.objects.get(pk=experiment_id)
        fields = {f.name: getattr(original, f.name) for f in Experiment._meta.concrete_fields
                  if f.name not in _NOT_COPIED}
        name = (name or "").strip() or f"{original.name} (copy)"
        copy = Experiment(name=name[:200], slug=_unique_slug(f"{original.slug}-copy"), **fields)
        copy.full_clean()
        copy.save()
        # Many-to-many settings (e.g. bot profiles, when they exist) belong to the design too.
        for m2m in Experiment._meta.many_to_many:
            getattr(copy, m2m.name).set(getattr(original, m2m.name).all())
        conditions = [{f.name: getattr(c, f.name) for f in Condition._meta.concrete_fields if f.name not in {"id", "experiment"}}
                      for c in original.conditions.all()]
        _conditions_create(copy, conditions)
    return copy


def _conditions_create(experiment: Experiment, conditions: list[dict[str, Any]]) -> None:
    specs = [game.ConditionSpec(name=c["name"], disclose_identity=c.get("disclose_identity", False),
                                disclose_from_round=c.get("disclose_from_round", 1), society=c.get("society", "hybrid"))
             for c in conditions]
    problems = game.condition_problems(conditions=specs, n_rounds=experiment.n_rounds, n_humans=experiment.n_humans)
    if problems:
        raise ValidationError({"conditions": problems})
    for fields in conditions:
        condition = Condition(experiment=experiment, **fields)
        condition.full_clean()
        condition.save()


def _unique_slug(text: str) -> str:
    """``text`` as a slug, with ``-2``, ``-3``… appended when it is taken (call inside a transaction)."""
    max_length = Experiment._meta.get_field("slug").max_length - 4
    base = slugify(text)[:max_length].strip("-") or "experiment"
    taken = set(Experiment.objects.filter(slug__startswith=base).values_list("slug", flat=True))
    if base not in taken:
        return base
    number = 2
    while f"{base}-{number}" in taken:
        number += 1
    return f"{base}-{number}"
