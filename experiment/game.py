"""Game rules as pure functions: plain values in, decisions out. No ORM, no clock, no global randomness.

Randomness always comes from a ``random.Random`` built by :func:`rng` from the group's seed and a
purpose, so a seeded group can be replayed exactly.
"""

from __future__ import annotations

import enum
import hashlib
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from urllib.parse import parse_qs, urlsplit

# Plain ASCII digits only: ``str.isdigit`` also accepts "²" or "١٢", which ``int`` then rejects or
# reads in surprising ways, and an unbounded digit string makes ``int`` raise past its size limit.
_DIGITS = re.compile(r"[0-9]{1,18}")
_SIGNED_DIGITS = re.compile(r"-?[0-9]{1,18}")


# Text no database can store: NUL (PostgreSQL refuses it in text and JSON) and UTF-16 surrogates without
# their pair (valid JSON, ``"\\ud83d"``, but not encodable as UTF-8: every driver refuses them).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


class Phase(enum.StrEnum):
    PITCH = "pitch"
    CHOICE = "choice"
    RETURN = "return"
    FEEDBACK = "feedback"
    BELIEF = "belief"


class RuleError(ValueError):
    """An action breaks a rule of the game. ``code`` is stable and machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Params:
    n_selectors: int = 3
    n_bot_selectors: int = 0
    n_candidates: int = 4
    n_bot_candidates: int = 2
    n_rounds: int = 10
    endowment: int = 10
    multiplier: int = 3
    fixed_send: bool = False
    message_max_chars: int = 200
    durations: Mapping[Phase, int] = field(
        default_factory=lambda: {Phase.PITCH: 60, Phase.CHOICE: 60, Phase.RETURN: 60, Phase.FEEDBACK: 15, Phase.BELIEF: 60}
    )
    belief_rounds: frozenset[int] = frozenset()
    unchosen_base: int = 0
    random_choice_on_timeout: bool = True
    dropout_after: int = 2
    bot_takes_over: bool = False

    @property
    def n_humans(self) -> int:
        return self.n_selectors + self.n_candidates - self.n_bot_selectors - self.n_bot_candidates


@dataclass(frozen=True)
class LabelPolicy:
    disclose: bool
    from_round: int = 1


# ---- design validation ------------------------------------------------------------------------

def parse_belief_rounds(spec: str, n_rounds: int) -> frozenset[int]:
    """``"last"`` → {R}; ``"1,5"`` → {1, 5}; ``""`` → {}. Raises RuleError for anything else."""
    spec = (spec or "").strip().lower()
    if not spec:
        return frozenset()
    rounds: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if part == "last":
            rounds.add(n_rounds)
            continue
        if not _DIGITS.fullmatch(part):
            raise RuleError("belief_rounds", f'Belief rounds must be "last" or round numbers separated by commas, not "{part}".')
        number = int(part)
        if not 1 <= number <= n_rounds:
            raise RuleError("belief_rounds",
                            f'Belief round {number} is outside rounds 1..{n_rounds}: use rounds from 1 to {n_rounds}, or "last".')
        rounds.add(number)
    return frozenset(rounds)


@dataclass(frozen=True)
class ConditionSpec:
    """A treatment arm as the design check sees it (no ORM)."""

    name: str
    disclose_identity: bool = False
    disclose_from_round: int = 1
    society: str = "hybrid"  # "hybrid" or "ai_only" (experiment.models.Society)


_CODE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def design_problems(*, n_selectors: int, n_bot_selectors: int, n_candidates: int, n_bot_candidates: int,
                    belief_rounds: str, n_rounds: int, quiz: object,
                    bonus_per_point: Decimal | int | None = None,
                    completion_code: str | None = None, lobby_timeout_code: str | None = None,
                    dropout_code: str | None = None, completion_redirect_url: str | None = None,
                    conditions: Sequence[ConditionSpec] | None = None) -> dict[str, str]:
    """Field → message for every impossible combination of parameters (empty when the design is valid).

    Each message says what is wrong and what to change. Arguments left at None are not checked; the
    conditions in particular are checked by whoever holds them (a model's ``clean`` cannot see conditions
    that are being edited in the same form), under the key ``"conditions"``.
    """
    problems: dict[str, str] = {}
    if n_bot_candidates > n_candidates:
        problems["n_bot_candidates"] = (f"There are {n_bot_candidates} bot candidates but only {n_candidates} candidate seats: "
                                        f"lower the bot candidates to {n_candidates} or fewer, or add candidate seats.")
    if n_bot_selectors > n_selectors:
        problems["n_bot_selectors"] = (f"There are {n_bot_selectors} bot selectors but only {n_selectors} selector seats: "
                                       f"lower the bot selectors to {n_selectors} or fewer, or add selector seats.")
    if n_candidates > 26:
        problems["n_candidates"] = "At most 26 candidates (pseudonyms A to Z): lower the number of candidates."
    if n_candidates < 2:
        problems["n_candidates"] = "Partner choice needs at least 2 candidates: set the number of candidates to 2 or more."
    try:
        parse_belief_rounds(belief_rounds, n_rounds)
    except RuleError as exc:
        problems["belief_rounds"] = exc.message
    quiz_problem = _quiz_problem(quiz)
    if quiz_problem:
        problems["quiz"] = quiz_problem
    if bonus_per_point is not None and bonus_per_point < 0:
        problems["bonus_per_point"] = "The bonus per point cannot be negative: enter 0 for no bonus, or an amount such as 0.01."
    problems.update(_code_problems(completion_code=completion_code, lobby_timeout_code=lobby_timeout_code,
                                   dropout_code=dropout_code, completion_redirect_url=completion_redirect_url))
    if conditions is not None:
        condition_problem = " ".join(condition_problems(conditions=conditions, n_rounds=n_rounds))
        if condition_problem:
            problems["conditions"] = condition_problem
    return problems


def condition_problems(*, conditions: Sequence[ConditionSpec], n_rounds: int, n_humans: int | None = None) -> list[str]:
    """What is wrong with a set of treatment arms (empty when they can run). ``n_humans``: human seats per group
    in the experiment's composition (None: not checked). A design with none can only run AI-only arms."""
    if not conditions:
        return ['Add at least one condition: every group is assigned to one, so an experiment without conditions '
                'cannot run (for example "hidden" without identity labels and "disclosed" with them).']
    problems: list[str] = []
    if n_humans == 0:
        hybrid = [c.name for c in conditions if c.society != "ai_only"]
        if hybrid:
            names = ", ".join(f'"{name}"' for name in hybrid)
            problems.append(f"Every seat is a bot, so no group can form from people in the lobby: set the society of "
                            f"condition {names} to AI only, or make some seats human.")
    seen: set[str] = set()
    for condition in conditions:
        key = condition.name.strip().lower()
        if key in seen:
            problems.append(f'Two conditions are named "{condition.name}": give each condition its own name.')
        seen.add(key)
        if condition.disclose_from_round > n_rounds:
            problems.append(
                f'Condition "{condition.name}" shows identity labels from round {condition.disclose_from_round}, but the '
                f'experiment has {n_rounds} rounds: set "disclose from round" to {n_rounds} or less, or add rounds.')
    return problems


def _code_problems(*, completion_code: str | None, lobby_timeout_code: str | None, dropout_code: str | None,
                   completion_redirect_url: str | None) -> dict[str, str]:
    problems: dict[str, str] = {}
    codes = {"completion_code": ("completion code", completion_code),
             "lobby_timeout_code": ("lobby timeout code", lobby_timeout_code),
             "dropout_code": ("dropout code", dropout_code)}
    for field_name, (label, code) in codes.items():
        if code is not None and (not code or not set(code) <= _CODE_CHARS):
            problems[field_name] = (f'The {label} "{code}" must be letters, digits, "-" or "_" only (participants paste it '
                                    "into the recruitment site): remove spaces and other characters.")
    # Participants who did not finish must not be able to claim a completion.
    for field_name in ("lobby_timeout_code", "dropout_code"):
        label, code = codes[field_name]
        if code is not None and completion_code and code == completion_code and field_name not in problems:
            problems[field_name] = (f'The {label} is the same as the completion code "{completion_code}": give it its own '
                                    "code so that people who did not finish the game can be told apart.")
    if completion_redirect_url and completion_code is not None:
        carried = parse_qs(urlsplit(completion_redirect_url).query).get("cc")
        if carried and carried[0] != completion_code:
            problems["completion_redirect_url"] = (
                f'The redirect URL hands the code "{carried[0]}" to the recruitment site, but the completion code is '
                f'"{completion_code}": make them the same (a Prolific completion URL ends in ?cc=<completion code>).')
    return problems


def _quiz_problem(quiz: object) -> str | None:
    example = 'for example [{"question": "Who decides the return?", "options": ["The selector", "The candidate"], ' \
              '"answer": "The candidate"}], or [] for no quiz'
    if not isinstance(quiz, list):
        return f"The quiz must be a list of questions, {example}."
    for number, item in enumerate(quiz, start=1):
        if not isinstance(item, dict) or not {"question", "options", "answer"} <= item.keys():
            return f'Question {number} needs "question", "options" and "answer", {example}.'
        if not isinstance(item["question"], str) or not item["question"].strip():
            return f"Question {number} has no question text: write it as a string."
        options = item["options"]
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) and o.strip() for o in options):
            return f'The options of question {number} must be a list of at least 2 texts, e.g. ["4", "7", "12"].'
        # Answers arrive from the browser as text, so a non-text answer could never be matched.
        if not isinstance(item["answer"], str) or item["answer"] not in options:
            return (f"The answer of question {number} must be one of its options, copied exactly as text "
                    f"(one of: {', '.join(options)}).")
    return None


# ---- randomness ---------------------------------------------------------------------------------

def rng(seed: int, *purpose: object) -> random.Random:
    """A generator determined by the seed and the purpose (stable across processes and runs)."""
    digest = hashlib.sha256(repr((seed, *purpose)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


# ---- phases -------------------------------------------------------------------------------------

def phases_of_round(round_number: int, params: Params) -> list[Phase]:
    phases = [Phase.PITCH, Phase.CHOICE, Phase.RETURN, Phase.FEEDBACK]
    if round_number in params.belief_rounds:
        phases.append(Phase.BELIEF)
    return phases


def next_phase(round_number: int, phase: Phase, params: Params) -> tuple[int, Phase] | None:
    """The (round, phase) after this one, or None when the game is over."""
    phases = phases_of_round(round_number, params)
    index = phases.index(phase)
    if index + 1 < len(phases):
        return round_number, phases[index + 1]
    if round_number < params.n_rounds:
        return round_number + 1, Phase.PITCH
    return None


def actors(phase: Phase) -> str | None:
    """Which role acts in a phase (None: nobody acts, the phase just runs its time)."""
    return {Phase.PITCH: "candidate", Phase.CHOICE: "selector", Phase.RETURN: "candidate",
            Phase.BELIEF: "selector"}.get(phase)


# ---- validation of single actions ---------------------------------------------------------------

def parse_points(value: object, *, name: str) -> int:
    """Accept whole numbers only (JSON ints, or strings of digits from forms)."""
    if isinstance(value, bool):
        raise RuleError("not_a_number", f"{name} must be a whole number.")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _SIGNED_DIGITS.fullmatch(value.strip()):
        return int(value.strip())
    raise RuleError("not_a_number", f"{name} must be a whole number.")


def check_sent(amount: object, params: Params) -> int:
    sent = parse_points(amount, name="The amount to send")
    if sent < 0:
        raise RuleError("amount_out_of_range", "The amount to send cannot be negative.")
    if sent > params.endowment:
        raise RuleError("amount_out_of_range", f"You can send at most {params.endowment} points.")
    if params.fixed_send and sent != params.endowment:
        raise RuleError("amount_out_of_range", f"In this game you always send {params.endowment} points.")
    return sent


def check_returned(amount: object, available: int) -> int:
    returned = parse_points(amount, name="The amount to return")
    if returned < 0:
        raise RuleError("amount_out_of_range", "The amount to return cannot be negative.")
    if returned > available:
        raise RuleError("amount_out_of_range", f"You can return at most {available} points.")
    return returned


def unstorable_text(value: object) -> bool:
    """Whether a string anywhere in ``value`` (a parsed JSON message: keys, values, nested) holds a NUL or a
    lone surrogate. Iterative, so that no nesting the JSON parser accepted can exhaust the stack here."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if _UNSTORABLE.search(item):
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def escape_unstorable(text: str) -> str:
    """``text`` with each NUL and lone surrogate written as its JSON escape (``\\u0000``, ``\\ud83d``): what
    such a character looked like in the JSON it came in, now storable. For text that must be kept rather
    than refused (a model's reply, as received)."""
    return _UNSTORABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def check_storable(value: object) -> None:
    if unstorable_text(value):
        raise RuleError("invalid_text", "The text contains a character that cannot be stored (a NUL character or "
                                        "half of an emoji or other character).")


def check_message(text: object, params: Params) -> str:
    if not isinstance(text, str):
        raise RuleError("invalid_message", "The message must be text.")
    text = text.replace("\r\n", "\n").strip()
    check_storable(text)
    if len(text) > params.message_max_chars:
        raise RuleError("message_too_long", f"Messages can be at most {params.message_max_chars} characters ({len(text)} given).")
    return text


def check_confidence(value: object) -> int:
    confidence = parse_points(value, name="Confidence")
    if not 50 <= confidence <= 100:
        raise RuleError("confidence_out_of_range", "Confidence must be between 50 and 100 %.")
    return confidence


# ---- payoffs --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Transfer:
    selector: str
    candidate: str | None
    sent: int
    returned: int


def multiplied(sent: int, params: Params) -> int:
    return sent * params.multiplier


def selector_payoff(sent: int, returned: int, params: Params) -> int:
    return params.endowment - sent + returned


def round_payoffs(transfers: Iterable[Transfer], selectors: Sequence[str], candidates: Sequence[str],
                  params: Params) -> dict[str, int]:
    """Points for every seat in one round. A candidate nobody chose earns the base."""
    payoffs = {s: params.endowment for s in selectors}
    earned: dict[str, int] = {}
    for t in transfers:
        payoffs[t.selector] = selector_payoff(t.sent, t.returned, params)
        if t.candidate is not None:
            earned[t.candidate] = earned.get(t.candidate, 0) + multiplied(t.sent, params) - t.returned
    for c in candidates:
        payoffs[c] = earned.get(c, params.unchosen_base)
    return payoffs


# ---- per-seat presentation ------------------------------------------------------------------------

def candidate_order(seed: int, selector_seat: str, round_number: int, candidates: Sequence[str]) -> list[str]:
    """The order in which one selector sees the candidates in one round (shuffled, reproducible)."""
    order = sorted(candidates)
    rng(seed, "order", selector_seat, round_number).shuffle(order)
    return order


def identity_label(policy: LabelPolicy, round_number: int, is_bot: bool) -> str:
    if not policy.disclose or round_number < policy.from_round:
        return ""
    return "AI bot" if is_bot else "Human"


# ---- defaults at a deadline -----------------------------------------------------------------------

def default_choice(seed: int, selector_seat: str, round_number: int, candidates: Sequence[str],
                   params: Params) -> str | None:
    if not params.random_choice_on_timeout or not candidates:
        return None
    return rng(seed, "default-choice", selector_seat, round_number).choice(sorted(candidates))


def is_dropped(consecutive_timeouts: int, params: Params) -> bool:
    return consecutive_timeouts >= params.dropout_after


# ---- grouping ---------------------------------------------------------------------------------------

PSEUDONYM_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]


@dataclass(frozen=True)
class SeatPlan:
    seat: str
    role: str  # "selector" | "candidate"
    is_bot: bool
    human_index: int | None  # index into the list of humans placed in the group


def plan_seats(n_humans_arrived: int, params: Params, seed: int) -> list[SeatPlan]:
    """Seat layout of a new group: which human gets which role and seat, which seats are bots.

    Roles are assigned at random within the composition; candidate pseudonyms (A, B, …) are
    assigned at random over human and bot candidates alike, so the letter carries no information.
    """
    if n_humans_arrived != params.n_humans:
        raise RuleError("composition", f"A group needs exactly {params.n_humans} humans.")
    r = rng(seed, "seats")
    human_selectors = params.n_selectors - params.n_bot_selectors
    humans = list(range(n_humans_arrived))
    r.shuffle(humans)
    selector_humans, candidate_humans = humans[:human_selectors], humans[human_selectors:]
    selector_slots = [(False, h) for h in selector_humans] + [(True, None)] * params.n_bot_selectors
    candidate_slots = [(False, h) for h in candidate_humans] + [(True, None)] * params.n_bot_candidates
    r.shuffle(selector_slots)
    r.shuffle(candidate_slots)
    plans = [SeatPlan(f"S{i + 1}", "selector", bot, h) for i, (bot, h) in enumerate(selector_slots)]
    plans += [SeatPlan(chr(ord("A") + i), "candidate", bot, h) for i, (bot, h) in enumerate(candidate_slots)]
    return plans


def pick_condition(groups_per_condition: Mapping[str, int], seed: int, group_number: int) -> str:
    """Balanced assignment: one of the arms with the fewest groups so far, ties broken at random."""
    if not groups_per_condition:
        raise RuleError("no_conditions", "The experiment has no conditions.")
    fewest = min(groups_per_condition.values())
    tied = sorted(name for name, count in groups_per_condition.items() if count == fewest)
    return rng(seed, "condition", group_number).choice(tied)


def colour_of(seat: str) -> str:
    return PSEUDONYM_COLOURS[(ord(seat[0]) - ord("A")) % len(PSEUDONYM_COLOURS)] if seat else "#555555"
