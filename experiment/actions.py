"""One entry point from protocol messages to services, shared by the websocket consumer, automated
seats (bots, synthetic participants) and anything else that speaks the protocol.
"""

from __future__ import annotations

from typing import Any

from experiment import services
from experiment.events import CLIENT_MESSAGES
from experiment.game import RuleError, check_storable


def dispatch(participant_id: int, message: object, *, automated: bool = False) -> dict[str, Any]:
    """Validate the shape of a client message and apply it. Returns the ``ack``; raises RuleError."""
    if not isinstance(message, dict):
        raise RuleError("invalid_message", "Each message must be a JSON object.")
    kind = message.get("type")
    if not isinstance(kind, str) or kind not in CLIENT_MESSAGES:  # a list or object "type" is not hashable
        raise RuleError("unknown_type", f"Unknown message type {str(kind)[:40]!r}.")
    ref = message.get("ref")
    if ref is not None and (not isinstance(ref, str) or len(ref) > 64):
        raise RuleError("invalid_message", '"ref" must be a string of at most 64 characters.')
    # Before anything reads it: a NUL or a lone surrogate in any string would fail when stored (and in
    # PostgreSQL abort the transaction), in the pitch, the quiz, the questionnaire or a field nobody reads.
    check_storable(message)
    ack: dict[str, Any] = {"type": "ack", "ref": ref, "action": kind}
    m = message
    if kind == "ping":
        pass
    elif kind == "consent":
        services.consent_submit(participant_id=participant_id, accept=m.get("accept"))
    elif kind == "instructions.done":
        services.instructions_done(participant_id=participant_id)
    elif kind == "quiz.submit":
        ack["result"] = services.quiz_submit(participant_id=participant_id, answers=m.get("answers"))
    elif kind == "pitch.submit":
        services.pitch_submit(participant_id=participant_id, round_number=m.get("round"), text=m.get("text"),
                              automated=automated)
    elif kind == "choice.submit":
        services.choice_submit(participant_id=participant_id, round_number=m.get("round"),
                               candidate=m.get("candidate"), amount=m.get("amount"), automated=automated)
    elif kind == "return.submit":
        services.return_submit(participant_id=participant_id, round_number=m.get("round"),
                               selector=m.get("selector"), amount=m.get("amount"), automated=automated)
    elif kind == "belief.submit":
        services.belief_submit(participant_id=participant_id, round_number=m.get("round"),
                               beliefs=m.get("beliefs"), automated=automated)
    elif kind == "questionnaire.submit":
        services.questionnaire_submit(participant_id=participant_id, answers=m.get("answers"))
    return ack
