"""Bot profiles (how a language model plays a seat), their decisions and every call made to a model.

Field ``help_text`` feeds the export codebook: say what a value means and its unit. API keys are never
stored: a profile names the environment variable that holds the key.
"""

from __future__ import annotations

import os
from decimal import Decimal

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.db.models import Q

DEFAULT_PERSONA = (
    "You are a participant in an online economic game played for real money with other people. "
    "You are warm, honest and cooperative. You believe that fair and generous exchanges leave everyone "
    "better off, and you keep the promises you make: when someone trusts you with points, you give back "
    "a generous share of what you receive. When you write to the other players, write like a friendly "
    "person in a short chat message: plain words, no lists, no emojis."
)

env_var_name = RegexValidator(r"^[A-Za-z_][A-Za-z0-9_]*$", "Give the name of an environment variable (letters, digits, _), "
                                                          "not the key itself.")

# Not Django's URLValidator: it refuses single-label hosts such as http://ollama:11434/v1 (a Docker service).
endpoint_url = RegexValidator(r"^https?://[^\s/?#]+(/[^\s?#]*)?$",
                              "Give the endpoint's base URL, e.g. https://api.openai.com/v1 or http://localhost:11434/v1.")


def token_cost(prices: tuple[Decimal, Decimal], tokens_in: int, tokens_out: int) -> Decimal:
    """US dollars for a call at ``prices`` (per 1,000 input and per 1,000 output tokens), to the micro-dollar."""
    cost = (Decimal(tokens_in) * prices[0] + Decimal(tokens_out) * prices[1]) / 1000
    return cost.quantize(Decimal("0.000001"))


class BotProfile(models.Model):
    """A language model configured the way a methods section describes it."""

    class Fallback(models.TextChoices):
        SCRIPTED = "scripted", "The offline scripted bot decides"
        DEFAULT = "default", "The phase default applies at the deadline"

    class ResponseFormat(models.TextChoices):
        JSON_SCHEMA = "json_schema", "JSON schema (structured outputs)"
        JSON_OBJECT = "json_object", "Any JSON object (JSON mode)"
        NONE = "none", "Not sent (the prompt asks for JSON)"

    class TokenLimitParam(models.TextChoices):
        MAX_COMPLETION_TOKENS = "max_completion_tokens", "max_completion_tokens (OpenAI, Azure, vLLM)"
        MAX_TOKENS = "max_tokens", "max_tokens (older endpoints, Ollama)"

    class Memory(models.TextChoices):
        """What of the earlier rounds the model sees in its prompt (docs/bots.md, "Memory arms")."""
        NONE = "none", "None: only the current round"
        OWN = "own", "Own: its own past rounds, as a person in its seat sees them"
        GROUP = "group", "Group: its own past rounds and the group's whole history (pitches, who chose whom, amounts)"

    name = models.CharField(max_length=100, unique=True, help_text="Name of the profile, e.g. 'gpt-4o-mini prosocial'.")
    base_url = models.CharField(max_length=500, default="https://api.openai.com/v1", validators=[endpoint_url],
                                help_text="OpenAI-compatible endpoint (OpenAI, Azure OpenAI v1, vLLM, Ollama …).")
    api_key_env = models.CharField(max_length=100, default="OPENAI_API_KEY", blank=True, validators=[env_var_name],
                                   help_text="Name of the environment variable that holds the API key (never the key).")
    requires_key = models.BooleanField(default=True,
                                       help_text="Whether the endpoint needs a key. Off for local keyless servers (vLLM, Ollama).")
    model = models.CharField(max_length=200, default="gpt-4o-mini",
                             help_text="Model name (for Azure OpenAI: the deployment name).")
    temperature = models.FloatField(null=True, blank=True, default=1.0,
                                    validators=[MinValueValidator(0.0), MaxValueValidator(2.0)],
                                    help_text="Sampling temperature 0..2; empty: not sent (the provider's default).")
    top_p = models.FloatField(null=True, blank=True, default=None, validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
                              help_text="Nucleus sampling 0..1; empty: not sent.")
    seed = models.BigIntegerField(null=True, blank=True,
                                  help_text="Seed sent with every request (best-effort determinism); empty: not sent.")
    max_tokens = models.PositiveIntegerField(default=400, validators=[MinValueValidator(16), MaxValueValidator(16000)],
                                             help_text="Most tokens the model may write per reply.")
    max_tokens_param = models.CharField(max_length=24, choices=TokenLimitParam.choices,
                                        default=TokenLimitParam.MAX_COMPLETION_TOKENS,
                                        help_text="Which request parameter carries the token limit.")
    response_format = models.CharField(max_length=12, choices=ResponseFormat.choices, default=ResponseFormat.JSON_SCHEMA,
                                       help_text="How the structured answer is requested from the endpoint.")
    system_prompt = models.TextField(default=DEFAULT_PERSONA,
                                     help_text="Persona placed first in the system prompt; the game's instructions follow it.")
    delay_min = models.FloatField(default=4.0, validators=[MinValueValidator(0.5), MaxValueValidator(600)],
                                  help_text="Shortest wait (s) after a phase opens before the bot's action is released.")
    delay_max = models.FloatField(default=15.0, validators=[MinValueValidator(0.5), MaxValueValidator(600)],
                                  help_text="Longest such wait (s). Always squeezed to end before the deadline.")
    typing_cps = models.FloatField(default=8.0, validators=[MinValueValidator(0.5), MaxValueValidator(1000)],
                                   help_text="Typing speed (characters per second) added to the delay for a message.")
    price_input_per_1k = models.DecimalField(max_digits=10, decimal_places=6, default=Decimal("0"),
                                             validators=[MinValueValidator(Decimal("0"))],
                                             help_text="Price per 1,000 input (prompt) tokens, in US dollars.")
    price_output_per_1k = models.DecimalField(max_digits=10, decimal_places=6, default=Decimal("0"),
                                              validators=[MinValueValidator(Decimal("0"))],
                                              help_text="Price per 1,000 output (completion) tokens, in US dollars.")
    fallback = models.CharField(max_length=8, choices=Fallback.choices, default=Fallback.SCRIPTED,
                                help_text="What decides when the model gives no usable answer after its retries.")
    timeout_seconds = models.FloatField(default=20.0, validators=[MinValueValidator(1.0), MaxValueValidator(120.0)],
                                        help_text="Longest wait for one reply (s).")
    max_retries = models.PositiveSmallIntegerField(default=2, validators=[MaxValueValidator(10)],
                                                   help_text="Retries after a failed request (timeout, 429, 5xx, connection), "
                                                             "with backoff that respects Retry-After.")
    # Limits (bots/limits.py, docs/deployment.md): shared by every worker through Redis, so that they hold for the
    # provider's quota of the key however many workers play this profile's seats.
    max_concurrent = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1, "Allow at least 1 request at a time, or leave empty "
                                                                 "for no limit."), MaxValueValidator(100_000)],
        help_text="Most requests to the model in flight at once, across all workers; empty: no limit.")
    requests_per_minute = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1, "Allow at least 1 request per minute, or leave empty "
                                                                 "for no limit."), MaxValueValidator(1_000_000)],
        help_text="Most requests to the model per minute, across all workers (a token bucket that holds one "
                  "minute's requests); empty: no limit.")
    budget_per_session_usd = models.DecimalField(
        max_digits=10, decimal_places=4, null=True, blank=True,
        validators=[MinValueValidator(Decimal("0.0001"), "A budget must be more than 0 US dollars, or leave it empty "
                                                         "for no budget.")],
        help_text="Most US dollars this profile may spend on model calls in one session; once spent, its seats make "
                  "no more calls and the phase default applies. Empty: no budget.")
    memory = models.CharField(max_length=5, choices=Memory.choices, default=Memory.OWN,
                              help_text="Memory arm: what of the earlier rounds the model sees in its prompt.")
    memory_rounds = models.PositiveSmallIntegerField(
        default=10, validators=[MinValueValidator(1), MaxValueValidator(200)],
        help_text="Most earlier rounds the prompt shows (the latest ones), so that a long game's prompt stays bounded.")
    created_at = models.DateTimeField(auto_now_add=True, help_text="When the profile was created (UTC).")
    updated_at = models.DateTimeField(auto_now=True, help_text="When the profile was last changed (UTC).")

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(condition=Q(delay_max__gte=models.F("delay_min")), name="botprofile_delay_range"),
            models.CheckConstraint(condition=Q(max_concurrent__isnull=True) | Q(max_concurrent__gte=1),
                                   name="botprofile_max_concurrent_positive"),
            models.CheckConstraint(condition=Q(requests_per_minute__isnull=True) | Q(requests_per_minute__gte=1),
                                   name="botprofile_requests_per_minute_positive"),
            models.CheckConstraint(condition=Q(budget_per_session_usd__isnull=True) | Q(budget_per_session_usd__gt=0),
                                   name="botprofile_budget_positive"),
        ]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        problems = {}
        if self.delay_min is not None and self.delay_max is not None and self.delay_max < self.delay_min:
            problems["delay_max"] = "The longest delay must not be shorter than the shortest delay."
        if self.requires_key and not self.api_key_env:
            problems["api_key_env"] = "Name the environment variable that holds the key, or untick 'requires key'."
        if (self.budget_per_session_usd is not None and not self.price_input_per_1k and not self.price_output_per_1k):
            problems["budget_per_session_usd"] = ("A budget needs the profile's prices: with both prices at 0 every call "
                                                  "costs nothing and the budget would never stop the calls.")
        if problems:
            raise ValidationError(problems)

    def api_key(self) -> str | None:
        """The key from the environment of the process that asks (web and workers both need it)."""
        if not self.api_key_env:
            return None
        return os.environ.get(self.api_key_env) or None

    @property
    def ready(self) -> bool:
        """True when this process can call the model (a key is set, or the endpoint needs none)."""
        return not self.requires_key or self.api_key() is not None

    def cost_of(self, tokens_in: int, tokens_out: int) -> Decimal:
        return token_cost((self.price_input_per_1k, self.price_output_per_1k), tokens_in, tokens_out)


class BotDecision(models.Model):
    """One automated seat's turn in one phase: claimed, decided (by the model or the fallback), then applied.

    The unique constraint makes the turn idempotent: a redelivered task finds the row and does not decide twice.
    """

    class Status(models.TextChoices):
        DECIDING = "deciding", "Waiting for the model"
        DECIDED = "decided", "Decided, waiting for the human-like delay"
        APPLIED = "applied", "Applied through the game services"
        LATE = "late", "Arrived after the phase closed; not applied"
        DEFAULTED = "defaulted", "No usable answer; the phase default applies"
        SKIPPED = "skipped", "Nothing to do any more (phase over or seat no longer automated)"
        REJECTED = "rejected", "Refused by the game's rules when released; the phase default applies"

    class Source(models.TextChoices):
        LLM = "llm", "Language model"
        SCRIPTED = "scripted", "Scripted fallback"
        NONE = "", "None"

    participant = models.ForeignKey("experiment.Participant", on_delete=models.CASCADE, related_name="bot_decisions",
                                    help_text="The seat.")
    group = models.ForeignKey("experiment.Group", on_delete=models.CASCADE, related_name="bot_decisions")
    session = models.ForeignKey("experiment.Session", on_delete=models.CASCADE, related_name="bot_decisions")
    profile = models.ForeignKey(BotProfile, on_delete=models.SET_NULL, null=True, blank=True, related_name="decisions",
                                help_text="Bot profile that played the seat.")
    round_number = models.PositiveSmallIntegerField(help_text="Round of the decision.")
    phase = models.CharField(max_length=10, help_text="Phase of the decision (pitch, choice, return, belief).")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.DECIDING,
                              help_text="Where the decision stands.")
    source = models.CharField(max_length=8, choices=Source.choices, default=Source.NONE, blank=True,
                              help_text="What produced the actions: the model, or the scripted fallback.")
    actions = models.JSONField(default=list, blank=True,
                               help_text="Protocol messages to apply (docs/protocol.md), exactly as sent to the services.")
    outcome = models.JSONField(default=dict, blank=True, help_text="Result of applying each action, or why it was not applied.")
    lease_until = models.DateTimeField(null=True, blank=True,
                                       help_text="A worker holds the turn until then; after it, another may take over.")
    apply_at = models.DateTimeField(null=True, blank=True, help_text="When the action is released (human-like delay, UTC).")
    throttled = models.PositiveIntegerField(default=0, help_text=(
        "Times the turn had to wait for its profile's limits (requests per minute, requests at once, or a "
        "Retry-After the endpoint gave another seat) before a request could be sent."))
    memory = models.CharField(max_length=5, blank=True, help_text=(
        "Memory arm the prompt of this turn was built with (none, own, group), copied from the profile when the turn "
        "was claimed; empty for a turn the model was never asked about."))
    memory_rounds = models.PositiveSmallIntegerField(null=True, blank=True, help_text=(
        "Most earlier rounds that prompt showed, copied from the profile with the memory arm."))
    created_at = models.DateTimeField(auto_now_add=True, help_text="When the turn was claimed (UTC).")
    decided_at = models.DateTimeField(null=True, blank=True, help_text="When the decision was made (UTC).")
    applied_at = models.DateTimeField(null=True, blank=True, help_text="When the decision was applied or found late (UTC).")

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["participant", "round_number", "phase"], name="botdecision_one_per_turn"),
        ]

    def __str__(self) -> str:
        return f"decision #{self.pk} (round {self.round_number} {self.phase})"


class LLMCall(models.Model):
    """One request to a language model and what came back. Written before the decision is applied."""

    class Status(models.TextChoices):
        PENDING = "pending", "Sent, no reply yet"
        OK = "ok", "Valid answer"
        INVALID = "invalid", "Answer broke the schema or the rules"
        ERROR = "error", "Request failed"
        LATE = "late", "Valid answer after the phase closed"

    class Purpose(models.TextChoices):
        DECIDE = "decide", "Decision"
        CORRECTION = "correction", "Corrective retry after an invalid answer"
        PROFILE_TEST = "profile_test", "Test from the admin"

    participant = models.ForeignKey("experiment.Participant", on_delete=models.CASCADE, null=True, blank=True,
                                    related_name="llm_calls", help_text="Seat the call was made for (empty for a profile test).")
    group = models.ForeignKey("experiment.Group", on_delete=models.CASCADE, null=True, blank=True, related_name="llm_calls")
    session = models.ForeignKey("experiment.Session", on_delete=models.CASCADE, null=True, blank=True, related_name="llm_calls")
    decision = models.ForeignKey(BotDecision, on_delete=models.CASCADE, null=True, blank=True, related_name="calls")
    profile = models.ForeignKey(BotProfile, on_delete=models.SET_NULL, null=True, blank=True, related_name="calls",
                                help_text="Bot profile used.")
    round_number = models.PositiveSmallIntegerField(null=True, blank=True, help_text="Round of the call.")
    phase = models.CharField(max_length=10, blank=True, help_text="Phase of the call.")
    attempt = models.PositiveSmallIntegerField(default=1, help_text="Attempt number within the decision, from 1.")
    throttled = models.PositiveIntegerField(default=0, help_text=(
        "Times the turn waited for its profile's limits (requests per minute, requests at once, a Retry-After "
        "given to another seat) since its previous request, before this request was sent."))
    purpose = models.CharField(max_length=12, choices=Purpose.choices, default=Purpose.DECIDE,
                               help_text="decide, correction (after an invalid answer) or profile_test.")
    request_messages = models.JSONField(default=list, help_text="The exact chat messages sent (system, user, …).")
    response_format = models.JSONField(null=True, blank=True, help_text="The response_format sent (JSON schema), if any.")
    raw_reply = models.TextField(blank=True, help_text=(
        "The reply text exactly as received; a NUL or an unpaired surrogate in it is written as its JSON escape "
        "(\\u0000, \\ud83d), as it was on the wire."))
    refusal = models.TextField(blank=True, help_text="The model's refusal message, when it refused.")
    parsed = models.JSONField(null=True, blank=True, help_text="The decision parsed from the reply (protocol messages).")
    model = models.CharField(max_length=200, help_text="Model requested.")
    model_reported = models.CharField(max_length=200, blank=True, help_text="Model name the endpoint reported.")
    parameters = models.JSONField(default=dict, help_text="Request parameters: base URL, temperature, top_p, seed, limits.")
    tokens_in = models.PositiveIntegerField(default=0, help_text="Prompt tokens reported by the endpoint.")
    tokens_out = models.PositiveIntegerField(default=0, help_text="Completion tokens reported by the endpoint.")
    latency_ms = models.PositiveIntegerField(null=True, blank=True, help_text="Time from request to reply or error (ms).")
    cost = models.DecimalField(max_digits=12, decimal_places=6, default=Decimal("0"),
                               help_text="Cost in US dollars from the profile's prices and the reported tokens.")
    http_status = models.PositiveSmallIntegerField(null=True, blank=True, help_text="HTTP status of a failed request.")
    error_class = models.CharField(max_length=100, blank=True, help_text="Kind of failure, e.g. RateLimitError, InvalidAnswer.")
    error_message = models.TextField(blank=True, help_text="What went wrong, in words.")
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.PENDING, db_index=True,
                              help_text="pending, ok, invalid, error or late.")
    applied = models.BooleanField(default=False, help_text="Whether this call's decision was applied in the game.")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True, help_text="When the request was sent (UTC).")
    finished_at = models.DateTimeField(null=True, blank=True, help_text="When the reply or error came back (UTC).")

    class Meta:
        ordering = ["id"]
        verbose_name = "LLM call"
        indexes = [models.Index(fields=["session", "status"], name="llmcall_session_status_idx")]

    def __str__(self) -> str:
        return f"LLM call #{self.pk} ({self.status})"
