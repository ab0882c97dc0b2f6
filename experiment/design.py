"""The frozen design of a session: every parameter, condition and bot profile as it was when play began.

The admin locks an experiment's design once people have joined, but a design can still change outside it (a
shell, the API, an edited bot profile), and a replication package must say exactly which rules produced its
data. So the first time a session admits someone (a person joins, or a group forms, as in simulations), the
experiment's design is copied into ``Session.design`` with the time (``Session.design_frozen_at``), once and
never again. The export ships the copies (``designs.json``) with a SHA-256 of each (:func:`digest`), so a
referee can check that two bundles, or a bundle and a preregistration, describe the same design.

A snapshot is plain JSON: the experiment's stored fields, then its conditions (by id) with the stored fields
of each one's bot profile, read through the relation (this module knows no bots code). API keys are never
stored in the database, so never here: a profile names the environment variable that holds its key.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django.utils import timezone

from experiment.models import Experiment, Session


def _fields(instance: models.Model, *, leave_out: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The stored fields of ``instance`` as JSON values (foreign keys as ids, decimals as strings)."""
    values = {f.attname: getattr(instance, f.attname) for f in instance._meta.concrete_fields if f.name not in leave_out}
    return json.loads(json.dumps(values, cls=DjangoJSONEncoder))


def snapshot(experiment: Experiment) -> dict[str, Any]:
    conditions = []
    for condition in experiment.conditions.select_related("bot_profile").order_by("id"):
        entry = _fields(condition, leave_out=frozenset({"experiment"}))
        entry["bot_profile"] = _fields(condition.bot_profile) if condition.bot_profile is not None else None
        conditions.append(entry)
    return {"experiment": _fields(experiment), "conditions": conditions}


def digest(design: dict[str, Any]) -> str:
    """SHA-256 of the design's canonical JSON (keys sorted, no spaces, UTF-8): the same design, the same hash."""
    canonical = json.dumps(design, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def freeze(session: Session) -> None:
    """Copy the experiment's design into the session, unless it was copied already. Call inside the transaction
    that admits the session's first participant, holding the session's lock."""
    if session.design is not None:
        return
    session.design = snapshot(session.experiment)
    session.design_frozen_at = timezone.now()
    Session.objects.filter(pk=session.pk, design__isnull=True).update(design=session.design,
                                                                      design_frozen_at=session.design_frozen_at)
