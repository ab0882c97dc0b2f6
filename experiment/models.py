"""The domain model. Invariants that the database can hold are declared here as constraints.

Field ``help_text`` is the source of the export codebook: say what a value means and its unit.
"""

from __future__ import annotations

import secrets
from decimal import Decimal

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import F, Q

from experiment import game


def _token() -> str:
    return secrets.token_urlsafe(24)


def _join_code() -> str:
    return secrets.token_urlsafe(9)


def _seed() -> int:
    return secrets.randbelow(2**31)


DEFAULT_CONSENT = (
    "You are invited to take part in a study on decision making. You will play a game with other "
    "participants for about 20 minutes. Your bonus depends on your decisions and those of others. "
    "Your data are stored anonymously and used for research only. You may stop at any time."
)
DEFAULT_INSTRUCTIONS = (
    "You play several rounds in a group. Some players are selectors, some are candidates.\n"
    "Each round, every candidate writes a short message. Each selector reads the messages, chooses one "
    "candidate and sends that candidate some of their {endowment} points. The amount sent is multiplied "
    "by {multiplier}. The candidate then decides how much of it to return to the selector.\n"
    "A selector earns {endowment} − sent + returned. A candidate earns what they were sent, multiplied, "
    "minus what they return."
)


def default_quiz() -> list[dict]:
    return [
        {
            "question": "A selector sends 4 points. The multiplier is 3. How many points does the candidate receive?",
            "options": ["4", "7", "12"],
            "answer": "12",
        },
        {
            "question": "Who decides how much of the multiplied amount goes back to the selector?",
            "options": ["The selector", "The candidate", "Chance"],
            "answer": "The candidate",
        },
    ]


class Experiment(models.Model):
    """A design: game parameters, conditions, group composition, texts."""

    class SendMode(models.TextChoices):
        FREE = "free", "Selector chooses 0..E"
        FIXED = "fixed", "Always the whole endowment E"

    class ChoiceTimeout(models.TextChoices):
        RANDOM = "random", "Random candidate, send 0"
        NONE = "none", "No choice, send 0"

    class DropoutPolicy(models.TextChoices):
        DEFAULTS = "defaults", "Defaults continue"
        BOT = "bot", "A scripted bot takes the seat"

    name = models.CharField(max_length=200, help_text="Human-readable name of the design.")
    slug = models.SlugField(unique=True, help_text="Short unique identifier of the experiment.")
    created_at = models.DateTimeField(auto_now_add=True, help_text="When the experiment was created (UTC).")

    n_selectors = models.PositiveSmallIntegerField(default=3, validators=[MinValueValidator(1)],
                                                   help_text="Selectors per group (S).")
    n_bot_selectors = models.PositiveSmallIntegerField(default=0, help_text="Of the selectors, how many are bots.")
    n_candidates = models.PositiveSmallIntegerField(default=4, validators=[MinValueValidator(1)],
                                                    help_text="Candidates per group (C).")
    n_bot_candidates = models.PositiveSmallIntegerField(default=2, help_text="Of the candidates, how many are bots.")
    n_rounds = models.PositiveSmallIntegerField(default=10, validators=[MinValueValidator(1), MaxValueValidator(200)],
                                                help_text="Rounds per group (R).")
    endowment = models.PositiveIntegerField(default=10, validators=[MinValueValidator(1)],
                                            help_text="Points a selector holds each round (E).")
    multiplier = models.PositiveIntegerField(default=3, validators=[MinValueValidator(1)],
                                             help_text="Factor applied to the amount sent.")
    send_mode = models.CharField(max_length=8, choices=SendMode.choices, default=SendMode.FREE,
                                 help_text="Whether selectors choose the amount or always send E.")
    message_max_chars = models.PositiveIntegerField(default=200, validators=[MinValueValidator(1), MaxValueValidator(2000)],
                                                    help_text="Longest pitch a candidate may write (characters).")
    pitch_seconds = models.PositiveIntegerField(default=60, validators=[MinValueValidator(1)], help_text="Pitch phase length (s).")
    choice_seconds = models.PositiveIntegerField(default=60, validators=[MinValueValidator(1)], help_text="Choice phase length (s).")
    return_seconds = models.PositiveIntegerField(default=60, validators=[MinValueValidator(1)], help_text="Return phase length (s).")
    feedback_seconds = models.PositiveIntegerField(default=15, validators=[MinValueValidator(1)], help_text="Feedback phase length (s).")
    belief_seconds = models.PositiveIntegerField(default=60, validators=[MinValueValidator(1)], help_text="Belief phase length (s).")
    belief_rounds = models.CharField(
        max_length=200, default="last", blank=True,
        help_text='Rounds with a belief phase: "last", a comma-separated list such as "1,5,10", or empty for none.',
    )
    show_public_tally = models.BooleanField(default=False, help_text="Show everyone how many selectors chose each candidate.")
    unchosen_base = models.PositiveIntegerField(default=0, help_text="Points an unchosen candidate earns in a round.")
    choice_timeout = models.CharField(max_length=8, choices=ChoiceTimeout.choices, default=ChoiceTimeout.RANDOM,
                                      help_text="Default applied when a selector does not choose in time.")
    dropout_after = models.PositiveSmallIntegerField(default=2, validators=[MinValueValidator(1)],
                                                     help_text="Consecutive timeouts after which a participant is marked dropped (K).")
    dropout_policy = models.CharField(max_length=10, choices=DropoutPolicy.choices, default=DropoutPolicy.DEFAULTS,
                                      help_text="What plays a dropped participant's seat from the next phase.")
    lobby_timeout_seconds = models.PositiveIntegerField(default=600, validators=[MinValueValidator(1)],
                                                        help_text="Longest wait in the lobby before being sent away (s).")
    bonus_per_point = models.DecimalField(max_digits=8, decimal_places=4, default=Decimal("0.0100"),
                                          validators=[MinValueValidator(Decimal("0"))],
                                          help_text="Money bonus per point earned.")
    currency = models.CharField(max_length=8, default="GBP", help_text="Currency of the bonus and fee.")
    participation_fee = models.DecimalField(max_digits=8, decimal_places=2, default=Decimal("2.00"),
                                            validators=[MinValueValidator(Decimal("0"))],
                                            help_text="Fixed participation payment, separate from the bonus.")
    completion_code = models.CharField(max_length=64, default="PLCOMPLETE", help_text="Code shown on completion.")
    lobby_timeout_code = models.CharField(max_length=64, default="PLLOBBY", help_text="Code shown after a lobby timeout.")
    dropout_code = models.CharField(max_length=64, default="PLDROPPED", help_text="Code shown to a dropped participant.")
    completion_redirect_url = models.URLField(blank=True, help_text="Where to send participants at the end (e.g. Prolific).")
    consent_text = models.TextField(default=DEFAULT_CONSENT, help_text="Consent form shown first.")
    instructions_text = models.TextField(default=DEFAULT_INSTRUCTIONS,
                                         help_text="Instructions; {endowment} and {multiplier} are filled in.")
    quiz = models.JSONField(default=default_quiz, blank=True,
                            help_text='Comprehension questions: a list of {"question", "options", "answer"}.')

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.name

    def params(self) -> game.Params:
        return game.Params(
            n_selectors=self.n_selectors,
            n_bot_selectors=self.n_bot_selectors,
            n_candidates=self.n_candidates,
            n_bot_candidates=self.n_bot_candidates,
            n_rounds=self.n_rounds,
            endowment=self.endowment,
            multiplier=self.multiplier,
            fixed_send=self.send_mode == self.SendMode.FIXED,
            message_max_chars=self.message_max_chars,
            durations={
                game.Phase.PITCH: self.pitch_seconds,
                game.Phase.CHOICE: self.choice_seconds,
                game.Phase.RETURN: self.return_seconds,
                game.Phase.FEEDBACK: self.feedback_seconds,
                game.Phase.BELIEF: self.belief_seconds,
            },
            belief_rounds=game.parse_belief_rounds(self.belief_rounds, self.n_rounds),
            unchosen_base=self.unchosen_base,
            random_choice_on_timeout=self.choice_timeout == self.ChoiceTimeout.RANDOM,
            dropout_after=self.dropout_after,
            bot_takes_over=self.dropout_policy == self.DropoutPolicy.BOT,
        )

    @property
    def n_humans(self) -> int:
        return self.n_selectors + self.n_candidates - self.n_bot_selectors - self.n_bot_candidates

    def clean(self) -> None:
        errors = game.design_problems(
            n_selectors=self.n_selectors, n_bot_selectors=self.n_bot_selectors,
            n_candidates=self.n_candidates, n_bot_candidates=self.n_bot_candidates,
            belief_rounds=self.belief_rounds, n_rounds=self.n_rounds, quiz=self.quiz,
            bonus_per_point=self.bonus_per_point, completion_code=self.completion_code,
            lobby_timeout_code=self.lobby_timeout_code, dropout_code=self.dropout_code,
            completion_redirect_url=self.completion_redirect_url,
        )
        # Conditions are checked where they are edited (the admin inline, presets): unsaved ones are not visible here.
        if errors:
            raise ValidationError(errors)


class Society(models.TextChoices):
    """Who sits in a group: the experiment's mix of people and bots, or bots in every seat."""

    HYBRID = "hybrid", "Hybrid: people in the human seats, bots in the bot seats"
    AI_ONLY = "ai_only", "AI only: a bot in every seat, no people"


class Condition(models.Model):
    """A treatment arm, assigned per group."""

    experiment = models.ForeignKey(Experiment, on_delete=models.CASCADE, related_name="conditions")
    name = models.SlugField(help_text='Name of the arm, e.g. "hidden" or "disclosed".')
    disclose_identity = models.BooleanField(default=False, help_text="Whether selectors see Human / AI bot labels.")
    disclose_from_round = models.PositiveSmallIntegerField(
        default=1, validators=[MinValueValidator(1)],
        help_text="First round in which labels are shown (when identity is disclosed).",
    )
    bot_profile = models.ForeignKey(
        "bots.BotProfile", on_delete=models.PROTECT, null=True, blank=True, related_name="conditions",
        help_text="Language model that plays this arm's bot seats (and seats bots take over). Empty, or its API key "
                  "missing from the environment: the offline scripted bot plays.",
    )

    society = models.CharField(
        max_length=8, choices=Society.choices, default=Society.HYBRID,
        help_text="hybrid: groups form in the lobby from the people who join, bots in the experiment's bot seats. "
                  "ai_only: the same seats and rules with a bot in every seat; such groups are started by staff "
                  "(cockpit or manage.py society), never from the lobby.")

    class Meta:
        ordering = ["id"]
        constraints = [models.UniqueConstraint(fields=["experiment", "name"], name="condition_unique_name")]

    def __str__(self) -> str:
        return self.name

    def label_policy(self) -> game.LabelPolicy:
        return game.LabelPolicy(disclose=self.disclose_identity, from_round=self.disclose_from_round)


class Session(models.Model):
    """One run of an experiment, with a join link and a capacity."""

    class Status(models.TextChoices):
        OPEN = "open", "Open for recruitment"
        PAUSED = "paused", "Recruitment paused"
        CLOSED = "closed", "Recruitment closed"

    experiment = models.ForeignKey(Experiment, on_delete=models.PROTECT, related_name="sessions")
    label = models.CharField(max_length=200, blank=True, help_text="Free label for the experimenter.")
    code = models.CharField(max_length=32, unique=True, default=_join_code, help_text="Public code in the join link.")
    capacity = models.PositiveIntegerField(default=21, validators=[MinValueValidator(1)],
                                           help_text="Human participants the study needs.")
    over_recruitment = models.PositiveIntegerField(
        default=0, help_text="Extra people admitted beyond the capacity, to make up for no-shows and dropouts.")
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.OPEN,
                              help_text="Whether new participants may join.")
    synthetic_fill_after = models.PositiveIntegerField(
        null=True, blank=True,
        help_text="Demo / pilot mode: after this many seconds in the lobby, synthetic participants fill the empty "
                  "human seats so the people waiting can play. Empty: never (real studies).",
    )
    seed = models.BigIntegerField(
        null=True, blank=True,
        help_text="Seed from which every group's seed is derived, so a session can be replayed exactly "
                  "(simulations set it). Empty: derived from the session's id and code.",
    )
    created_at = models.DateTimeField(auto_now_add=True, help_text="When the session was created (UTC).")
    ended_at = models.DateTimeField(null=True, blank=True, help_text="When staff ended the session (UTC).")
    design = models.JSONField(
        null=True, blank=True, editable=False,
        help_text="The experiment's design (every parameter, condition and bot profile) frozen when the session "
                  "admitted its first participant (experiment/design.py). Empty until then.")
    design_frozen_at = models.DateTimeField(null=True, blank=True, editable=False,
                                            help_text="When the design was frozen (UTC).")

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.experiment.slug} / {self.label or self.code}"


class Group(models.Model):
    """One mini-society playing together through all rounds. The lock for every game action."""

    class Status(models.TextChoices):
        PLAYING = "playing", "Playing"
        FINISHED = "finished", "Finished"

    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="groups")
    condition = models.ForeignKey(Condition, on_delete=models.PROTECT, related_name="groups",
                                  help_text="Treatment arm of the group.")
    number = models.PositiveIntegerField(help_text="Group number within the session, from 1.")
    society = models.CharField(max_length=8, choices=Society.choices, default=Society.HYBRID,
                               help_text="hybrid (people and bots, formed in the lobby) or ai_only (a bot in every "
                                         "seat, started by staff).")
    seed = models.BigIntegerField(default=_seed, help_text="Seed for the group's randomness (orders, defaults).")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PLAYING)
    round_number = models.PositiveSmallIntegerField(default=1, help_text="Current round, from 1.")
    phase = models.CharField(max_length=10, choices=[(p.value, p.value) for p in game.Phase], default=game.Phase.PITCH)
    phase_started_at = models.DateTimeField(null=True, help_text="When the current phase opened (UTC).")
    phase_deadline = models.DateTimeField(null=True, db_index=True, help_text="When the current phase closes (UTC).")
    version = models.PositiveIntegerField(default=0, help_text="Increases with every state change of the group.")
    paused_at = models.DateTimeField(null=True, blank=True, help_text="When staff paused the group (empty: running).")
    paused_remaining = models.FloatField(null=True, blank=True,
                                         help_text="Seconds that were left in the phase when the group was paused.")
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["session", "number"]
        constraints = [models.UniqueConstraint(fields=["session", "number"], name="group_unique_number")]
        indexes = [models.Index(fields=["status", "phase_deadline"], name="group_due_idx")]

    def __str__(self) -> str:
        return f"group {self.number} of {self.session}"


class Participant(models.Model):
    """One seat: a human with a private token, or a bot. Roles are fixed for the whole game."""

    class Kind(models.TextChoices):
        HUMAN = "human", "Human"
        BOT = "bot", "Bot"

    class Role(models.TextChoices):
        SELECTOR = "selector", "Selector"
        CANDIDATE = "candidate", "Candidate"

    class Controller(models.TextChoices):
        PERSON = "person", "A person in a browser"
        SYNTHETIC = "synthetic", "Synthetic human (demo / simulation)"
        SCRIPTED = "scripted", "Offline scripted bot"
        LLM = "llm", "Language model"

    class Status(models.TextChoices):
        CONSENT = "consent", "Reading consent"
        INSTRUCTIONS = "instructions", "Reading instructions"
        QUIZ = "quiz", "Comprehension quiz"
        LOBBY = "lobby", "Waiting in lobby"
        PLAYING = "playing", "Playing"
        QUESTIONNAIRE = "questionnaire", "Questionnaire"
        FINISHED = "finished", "Finished"
        DECLINED = "declined", "Declined consent"
        LOBBY_TIMEOUT = "lobby_timeout", "Lobby timeout"
        DROPPED = "dropped", "Dropped out"

    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="participants")
    group = models.ForeignKey(Group, on_delete=models.CASCADE, null=True, blank=True, related_name="participants")
    token = models.CharField(max_length=64, unique=True, default=_token, help_text="Private token (never exported).")
    kind = models.CharField(max_length=5, choices=Kind.choices, default=Kind.HUMAN,
                            help_text="Whether the seat is a human seat or a bot seat by design.")
    controller = models.CharField(max_length=10, choices=Controller.choices, default=Controller.PERSON,
                                  help_text="What plays the seat now (changes when a bot takes over).")
    role = models.CharField(max_length=9, choices=Role.choices, blank=True, help_text="selector or candidate.")
    seat = models.CharField(max_length=4, blank=True,
                            help_text='Seat label in the group: "A".."Z" for candidates (the pseudonym), "S1".. for selectors.')
    status = models.CharField(max_length=14, choices=Status.choices, default=Status.CONSENT, db_index=True)
    prolific_pid = models.CharField(max_length=64, blank=True, help_text="Recruitment id (PROLIFIC_PID).")
    study_id = models.CharField(max_length=64, blank=True, help_text="Recruitment STUDY_ID.")
    recruitment_session_id = models.CharField(max_length=64, blank=True, help_text="Recruitment SESSION_ID.")
    quiz_attempts = models.PositiveSmallIntegerField(default=0, help_text="Submissions of the comprehension quiz.")
    consecutive_timeouts = models.PositiveSmallIntegerField(default=0)
    connections = models.PositiveSmallIntegerField(
        default=0, help_text="Open websocket connections of the seat now (the number of its SeatConnection rows).")
    last_seen_at = models.DateTimeField(null=True, blank=True, help_text="Last connect, disconnect or message (UTC).")
    payoff = models.IntegerField(default=0, help_text="Points earned over all rounds.")
    joined_at = models.DateTimeField(auto_now_add=True, help_text="When the participant opened the join link (UTC).")
    lobby_at = models.DateTimeField(null=True, blank=True, help_text="When the participant entered the lobby (UTC).")
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["session", "group", "role", "seat", "id"]
        constraints = [
            models.UniqueConstraint(fields=["group", "seat"], condition=Q(group__isnull=False),
                                    name="participant_unique_seat"),
            models.UniqueConstraint(fields=["session", "prolific_pid"], condition=~Q(prolific_pid=""),
                                    name="participant_unique_recruitment_id"),
        ]

    def __str__(self) -> str:
        return f"{self.seat or 'unseated'} #{self.pk}"

    @property
    def is_automated(self) -> bool:
        return self.controller != self.Controller.PERSON

    @property
    def public_name(self) -> str:
        return self.name_of(self.role, self.seat)

    @classmethod
    def name_of(cls, role: str, seat: str) -> str:
        """The name the game shows for a seat ("Candidate B", "Selector 2"), from its role and seat alone."""
        if role == cls.Role.CANDIDATE:
            return f"Candidate {seat}"
        return f"Selector {seat[1:]}" if seat else "Participant"


class SeatConnection(models.Model):
    """One open participant websocket and the web process that serves it.

    The process refreshes ``seen_at`` of its rows while it runs (experiment/presence.py). A process that is
    killed never closes its connections: the sweep removes rows nobody refreshed any more, so the seat no
    longer shows as connected.
    """

    participant = models.ForeignKey(Participant, on_delete=models.CASCADE, related_name="open_connections")
    process = models.CharField(max_length=200, help_text="The web process run serving it (host:pid:random).")
    opened_at = models.DateTimeField(help_text="When the websocket was accepted (UTC, server time).")
    seen_at = models.DateTimeField(help_text="Last heartbeat of the serving process (UTC, server time).")

    class Meta:
        indexes = [models.Index(fields=["process"], name="seatconn_process_idx"),
                   models.Index(fields=["seen_at"], name="seatconn_seen_idx")]

    def __str__(self) -> str:
        return f"connection {self.pk} of {self.participant_id} via {self.process}"


class Message(models.Model):
    """A candidate's pitch in one round (text empty and timed_out when none was written in time)."""

    group = models.ForeignKey(Group, on_delete=models.CASCADE, related_name="messages")
    round_number = models.PositiveSmallIntegerField(help_text="Round of the pitch.")
    candidate = models.ForeignKey(Participant, on_delete=models.CASCADE, related_name="messages")
    text = models.TextField(blank=True, help_text="The message as written, stored as plain text.")
    timed_out = models.BooleanField(default=False, help_text="True when the phase closed before the candidate wrote.")
    decided_by = models.CharField(
        max_length=10, choices=Participant.Controller.choices, blank=True,
        help_text="What made this decision: person, synthetic, scripted or llm; empty when a default was applied. "
                  "Differs from the seat's kind after a bot took over a person's seat.")
    decision_seconds = models.FloatField(null=True, blank=True, help_text="Seconds from phase start to the message.")
    created_at = models.DateTimeField(auto_now_add=True, help_text="Server time the message was stored (UTC).")

    class Meta:
        ordering = ["round_number", "candidate__seat"]
        constraints = [models.UniqueConstraint(fields=["candidate", "round_number"], name="message_one_per_round")]

    def __str__(self) -> str:
        return f"pitch of {self.candidate_id} in round {self.round_number}"



class Choice(models.Model):
    """A selector's choice in one round."""

    group = models.ForeignKey(Group, on_delete=models.CASCADE, related_name="choices")
    round_number = models.PositiveSmallIntegerField(help_text="Round of the choice.")
    selector = models.ForeignKey(Participant, on_delete=models.CASCADE, related_name="choices")
    candidate = models.ForeignKey(Participant, on_delete=models.CASCADE, null=True, blank=True,
                                  related_name="chosen_in", help_text="Chosen candidate; empty for no choice.")
    position = models.PositiveSmallIntegerField(null=True, blank=True,
                                                help_text="Position of the chosen candidate in the selector's list (1 = top).")
    order = models.JSONField(default=list, help_text="Candidate seats in the order this selector saw them.")
    label_shown = models.CharField(max_length=10, blank=True,
                                   help_text='Identity label shown for the chosen candidate: "Human", "AI bot" or empty.')
    sent = models.PositiveIntegerField(help_text="Points sent (0..E).")
    multiplied = models.PositiveIntegerField(help_text="Points the candidate received: sent × multiplier.")
    timed_out = models.BooleanField(default=False, help_text="True when the default was applied at the deadline.")
    decided_by = models.CharField(
        max_length=10, choices=Participant.Controller.choices, blank=True,
        help_text="What made this decision: person, synthetic, scripted or llm; empty when a default was applied. "
                  "Differs from the seat's kind after a bot took over a person's seat.")
    decision_seconds = models.FloatField(null=True, blank=True, help_text="Seconds from phase start to the choice.")
    created_at = models.DateTimeField(auto_now_add=True, help_text="Server time the choice was stored (UTC).")

    class Meta:
        ordering = ["round_number", "selector__seat"]
        constraints = [
            models.UniqueConstraint(fields=["selector", "round_number"], name="choice_one_per_round"),
            models.CheckConstraint(condition=Q(multiplied__gte=F("sent")), name="choice_multiplied_ge_sent"),
            models.CheckConstraint(condition=Q(candidate__isnull=False) | Q(sent=0), name="choice_none_sends_zero"),
        ]

    def __str__(self) -> str:
        return f"choice of {self.selector_id} in round {self.round_number}"



class Return(models.Model):
    """A chosen candidate's return to one selector."""

    choice = models.OneToOneField(Choice, on_delete=models.CASCADE, related_name="return_decision")
    candidate = models.ForeignKey(Participant, on_delete=models.CASCADE, related_name="returns")
    available = models.PositiveIntegerField(help_text="Points the candidate could return (= multiplied).")
    returned = models.PositiveIntegerField(help_text="Points returned to the selector (0..available).")
    timed_out = models.BooleanField(default=False, help_text="True when the default (0) was applied at the deadline.")
    decided_by = models.CharField(
        max_length=10, choices=Participant.Controller.choices, blank=True,
        help_text="What made this decision: person, synthetic, scripted or llm; empty when a default was applied. "
                  "Differs from the seat's kind after a bot took over a person's seat.")
    decision_seconds = models.FloatField(null=True, blank=True, help_text="Seconds from phase start to the return.")
    created_at = models.DateTimeField(auto_now_add=True, help_text="Server time the return was stored (UTC).")

    class Meta:
        constraints = [models.CheckConstraint(condition=Q(returned__lte=F("available")), name="return_within_available")]

    def __str__(self) -> str:
        return f"return {self.returned}/{self.available} for choice {self.choice_id}"



class RoundPayoff(models.Model):
    """Points a participant earned in one round."""

    participant = models.ForeignKey(Participant, on_delete=models.CASCADE, related_name="round_payoffs")
    round_number = models.PositiveSmallIntegerField(help_text="Round the points were earned in.")
    points = models.IntegerField(help_text="Points earned in the round.")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["participant", "round_number"], name="payoff_one_per_round")]

    def __str__(self) -> str:
        return f"{self.points} points for {self.participant_id} in round {self.round_number}"



class Belief(models.Model):
    """A selector's guess whether a candidate is a human or a bot."""

    class Guess(models.TextChoices):
        HUMAN = "human", "Human"
        BOT = "bot", "Bot"

    group = models.ForeignKey(Group, on_delete=models.CASCADE, related_name="beliefs")
    round_number = models.PositiveSmallIntegerField(help_text="Round of the belief phase.")
    selector = models.ForeignKey(Participant, on_delete=models.CASCADE, related_name="beliefs")
    candidate = models.ForeignKey(Participant, on_delete=models.CASCADE, related_name="beliefs_about")
    guess = models.CharField(max_length=5, choices=Guess.choices, blank=True, help_text="human, bot, or empty when timed out.")
    confidence = models.PositiveSmallIntegerField(null=True, blank=True, help_text="Confidence in the guess, 50..100 %.")
    timed_out = models.BooleanField(default=False, help_text="True when no guess was given before the deadline.")
    created_at = models.DateTimeField(auto_now_add=True, help_text="Server time the belief was stored (UTC).")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["selector", "candidate", "round_number"], name="belief_one_per_candidate"),
            models.CheckConstraint(condition=Q(confidence__isnull=True) | Q(confidence__gte=50, confidence__lte=100),
                                   name="belief_confidence_range"),
        ]

    def __str__(self) -> str:
        return f"belief of {self.selector_id} about {self.candidate_id} in round {self.round_number}"



class QuestionnaireResponse(models.Model):
    participant = models.OneToOneField(Participant, on_delete=models.CASCADE, related_name="questionnaire")
    answers = models.JSONField(help_text="Answers keyed by question id.")
    created_at = models.DateTimeField(auto_now_add=True, help_text="Server time the answers were stored (UTC).")

    def __str__(self) -> str:
        return f"questionnaire of {self.participant_id}"



class Event(models.Model):
    """Append-only log of every state change, written in the same transaction as the change."""

    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="events")
    group = models.ForeignKey(Group, on_delete=models.CASCADE, null=True, blank=True, related_name="events")
    participant = models.ForeignKey(Participant, on_delete=models.SET_NULL, null=True, blank=True, related_name="events")
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True,
                              help_text="Staff user who caused the event, when one did.")
    type = models.CharField(max_length=40, db_index=True, help_text="Event type, e.g. choice.submitted.")
    round_number = models.PositiveSmallIntegerField(null=True, blank=True)
    phase = models.CharField(max_length=10, blank=True)
    payload = models.JSONField(default=dict, help_text="Details of the event.")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True, help_text="Server time (UTC).")

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.type} at {self.created_at:%Y-%m-%d %H:%M:%S}"

