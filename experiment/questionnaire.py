"""The post-game questionnaire: its questions and the validation of answers."""

from __future__ import annotations

from typing import Any

from experiment.game import RuleError, check_storable, parse_points

QUESTIONS: list[dict[str, Any]] = [
    {"id": "age", "text": "How old are you?", "kind": "number", "min": 18, "max": 100},
    {"id": "gender", "text": "Your gender", "kind": "choice",
     "options": ["female", "male", "non-binary", "prefer not to say"]},
    {"id": "ai_attitude", "text": "How do you feel about artificial intelligence in everyday life? "
                                   "(1 = very negative, 7 = very positive)", "kind": "scale", "min": 1, "max": 7},
    {"id": "suspected_bots", "text": "Did you think some candidates were bots?", "kind": "choice",
     "options": ["yes", "no", "not sure"]},
    {"id": "comments", "text": "Anything else you would like to tell us? (optional)", "kind": "text",
     "max_length": 1000, "optional": True},
]


def clean_answers(answers: object) -> dict[str, Any]:
    """Validated answers keyed by question id; RuleError naming the first bad one."""
    if not isinstance(answers, dict):
        raise RuleError("invalid_message", '"answers" must be an object keyed by question id.')
    check_storable(answers)
    clean: dict[str, Any] = {}
    for q in QUESTIONS:
        value = answers.get(q["id"])
        if value in (None, "") and q.get("optional"):
            clean[q["id"]] = ""
            continue
        if q["kind"] in ("number", "scale"):
            try:
                number = parse_points(value, name=q["text"])
            except RuleError:
                raise RuleError("invalid_answer", f'"{q["text"]}" needs a whole number.') from None
            if not q["min"] <= number <= q["max"]:
                raise RuleError("invalid_answer", f'"{q["text"]}" must be between {q["min"]} and {q["max"]}.')
            clean[q["id"]] = number
        elif q["kind"] == "choice":
            if value not in q["options"]:
                raise RuleError("invalid_answer", f'"{q["text"]}": choose one of {", ".join(q["options"])}.')
            clean[q["id"]] = value
        else:
            if not isinstance(value, str) or len(value) > q["max_length"]:
                raise RuleError("invalid_answer", f'"{q["text"]}" takes text of at most {q["max_length"]} characters.')
            clean[q["id"]] = value.strip()
    return clean
