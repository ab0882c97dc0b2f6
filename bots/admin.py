"""Admin for bot profiles (with a "test this profile" button), LLM calls and bot decisions (read-only)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Count, QuerySet, Sum
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html

from bots import llm, prompts
from bots.models import DEFAULT_PERSONA, BotDecision, BotProfile, LLMCall
from experiment.models import DEFAULT_INSTRUCTIONS

TEST_TIMEOUT = 15.0  # seconds: the test runs inside an admin request, so it is kept short

SAMPLE_STATE: dict[str, Any] = {
    "me": {"seat": "B", "role": "candidate", "name": "Candidate B"},
    "experiment": {"rounds": 10, "endowment": 10, "multiplier": 3, "message_max_chars": 200, "fixed_send": False},
    "game": {"round": 1, "rounds": 10, "phase": "pitch", "deadline": None, "payoff_total": 0, "todo": True,
             "candidates": []},
}


def profile_test(profile: BotProfile) -> dict[str, Any]:
    """Send one sample request (a round-1 pitch) and describe the outcome in plain words. Records the call."""
    name, schema = prompts.schema_for(SAMPLE_STATE)
    messages_ = prompts.messages_for(persona=profile.system_prompt or DEFAULT_PERSONA, instructions=DEFAULT_INSTRUCTIONS,
                                     state=SAMPLE_STATE, history=[], now=timezone.now())
    try:
        settings = llm.LLMSettings.from_profile(profile, timeout=min(profile.timeout_seconds, TEST_TIMEOUT))
    except llm.MissingKey as exc:
        LLMCall.objects.create(profile=profile, purpose=LLMCall.Purpose.PROFILE_TEST, model=profile.model,
                               request_messages=messages_, status=LLMCall.Status.ERROR, error_class="MissingKey",
                               error_message=str(exc), finished_at=timezone.now())
        return {"ok": False, "error": f"{exc} Bots of this profile are played by the offline scripted bot until it is set.",
                "error_class": "MissingKey"}
    response_format = settings.response_format(name, schema)
    call = LLMCall.objects.create(profile=profile, purpose=LLMCall.Purpose.PROFILE_TEST, model=settings.model,
                                  request_messages=messages_, response_format=response_format,
                                  parameters=settings.parameters())
    result = llm.complete(settings, messages_, response_format)
    call.raw_reply, call.refusal, call.model_reported = result.text or "", result.refusal or "", result.model[:200]
    call.tokens_in, call.tokens_out, call.latency_ms = result.tokens_in, result.tokens_out, result.latency_ms
    call.cost, call.http_status, call.finished_at = profile.cost_of(result.tokens_in, result.tokens_out), result.http_status, timezone.now()
    outcome: dict[str, Any] = {"ok": result.ok, "latency_ms": result.latency_ms, "tokens_in": result.tokens_in,
                               "tokens_out": result.tokens_out, "cost": call.cost, "reply": result.text or result.refusal or "",
                               "model": result.model, "call_id": None}
    if not result.ok:
        call.status, call.error_class, call.error_message = LLMCall.Status.ERROR, result.error_class, result.error_message
        outcome.update(error=result.error_message, error_class=result.error_class)
    else:
        try:
            parsed = prompts.interpret(SAMPLE_STATE, result.text, result.refusal)
        except prompts.InvalidAnswer as exc:
            call.status, call.error_class, call.error_message = LLMCall.Status.INVALID, "InvalidAnswer", exc.message
            outcome.update(ok=False, error_class="InvalidAnswer",
                           error=f"The endpoint answered, but the answer cannot be used as a game move: {exc.message} "
                                 "In a game the bot would get one corrective retry, then the fallback would act.")
        else:
            call.status, call.parsed = LLMCall.Status.OK, parsed
            outcome["message"] = parsed[0]["text"]
    call.save()
    outcome["call_id"] = call.pk
    return outcome


@admin.register(BotProfile)
class BotProfileAdmin(admin.ModelAdmin):
    list_display = ["name", "model", "base_url", "readiness", "memory", "fallback", "updated_at"]
    search_fields = ["name", "model", "base_url"]
    readonly_fields = ["readiness", "created_at", "updated_at"]
    actions = ["test_profiles"]
    change_form_template = "admin/bots/botprofile/change_form.html"
    fieldsets = [
        (None, {"fields": ["name", "readiness"]}),
        ("Endpoint", {"fields": ["base_url", "api_key_env", "requires_key", "model", "response_format", "max_tokens_param"],
                      "description": "Any OpenAI-compatible endpoint. The key is read from the named environment variable "
                                     "in the web process and the workers; it is never stored. See docs/bots.md."}),
        ("Sampling", {"fields": ["temperature", "top_p", "seed", "max_tokens"]}),
        ("Persona", {"fields": ["system_prompt"]}),
        ("Memory arm", {"fields": ["memory", "memory_rounds"],
                        "description": "What of the earlier rounds the model sees: nothing, its own past rounds, or the "
                                       "group's whole history; at most the latest memory_rounds rounds (docs/bots.md)."}),
        ("Human-like timing", {"fields": ["delay_min", "delay_max", "typing_cps"]}),
        ("Cost", {"fields": ["price_input_per_1k", "price_output_per_1k"]}),
        ("Limits (shared by all workers)", {"fields": ["max_concurrent", "requests_per_minute", "budget_per_session_usd"],
                                            "description": "Keep the provider's quota for this key across every worker, "
                                                           "and cap what one session may spend (docs/deployment.md)."}),
        ("When the model fails", {"fields": ["fallback", "timeout_seconds", "max_retries"]}),
        ("Record", {"fields": ["created_at", "updated_at"]}),
    ]

    @admin.display(description="Plays as")
    def readiness(self, obj: BotProfile) -> str:
        if obj.pk is None:
            return "—"
        if obj.ready:
            return "Language model (key found)" if obj.requires_key else "Language model (keyless endpoint)"
        return f"Offline scripted bot: the environment variable {obj.api_key_env} is not set"

    def get_urls(self) -> list[Any]:
        return [path("<path:object_id>/test/", self.admin_site.admin_view(self.test_view), name="bots_botprofile_test"),
                *super().get_urls()]

    def test_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        profile = get_object_or_404(BotProfile, pk=object_id)
        if not self.has_change_permission(request, profile):
            raise PermissionDenied
        outcome = profile_test(profile) if request.method == "POST" else None
        context = {**self.admin_site.each_context(request), "opts": self.model._meta, "original": profile,
                   "title": f"Test {profile}", "outcome": outcome,
                   "calls_url": reverse("admin:bots_llmcall_changelist") + f"?profile__id__exact={profile.pk}"}
        return TemplateResponse(request, "admin/bots/botprofile/test.html", context)

    @admin.action(description="Test the selected profiles (one sample request each)")
    def test_profiles(self, request: HttpRequest, queryset: QuerySet[BotProfile]) -> None:
        for profile in queryset[:5]:
            outcome = profile_test(profile)
            if outcome["ok"]:
                self.message_user(request, f"{profile}: answered in {outcome['latency_ms']} ms, "
                                           f"{outcome['tokens_in']}+{outcome['tokens_out']} tokens, ${outcome['cost']}: "
                                           f"“{outcome.get('message', '')}”", messages.SUCCESS)
            else:
                self.message_user(request, f"{profile}: {outcome['error']}", messages.ERROR)


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(LLMCall)
class LLMCallAdmin(ReadOnlyAdmin):
    list_display = ["id", "created_at", "session", "seat", "round_number", "phase", "attempt", "purpose", "status", "model",
                    "tokens_in", "tokens_out", "cost", "latency_ms", "applied", "error_class"]
    list_filter = ["status", "purpose", "applied", "profile", "session", "phase"]
    search_fields = ["raw_reply", "error_message", "model"]
    list_select_related = ["participant", "session__experiment"]
    date_hierarchy = "created_at"
    change_list_template = "admin/bots/llmcall/change_list.html"

    @admin.display(description="Seat", ordering="participant__seat")
    def seat(self, obj: LLMCall) -> str:
        return obj.participant.seat if obj.participant else "—"

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        response = super().changelist_view(request, extra_context)
        changelist = getattr(response, "context_data", {}).get("cl") if hasattr(response, "context_data") else None
        if changelist is not None:
            totals = changelist.queryset.aggregate(calls=Count("id"), tokens_in=Sum("tokens_in"), tokens_out=Sum("tokens_out"),
                                                   cost=Sum("cost"))
            totals["cost"] = (totals["cost"] or Decimal("0")).quantize(Decimal("0.000001"))
            response.context_data["llm_totals"] = totals
        return response


@admin.register(BotDecision)
class BotDecisionAdmin(ReadOnlyAdmin):
    list_display = ["id", "created_at", "session", "seat", "round_number", "phase", "status", "source", "memory", "throttled",
                    "apply_at", "calls_link"]
    list_filter = ["status", "source", "session", "phase"]
    list_select_related = ["participant", "session__experiment"]

    @admin.display(description="Seat", ordering="participant__seat")
    def seat(self, obj: BotDecision) -> str:
        return obj.participant.seat

    @admin.display(description="LLM calls")
    def calls_link(self, obj: BotDecision) -> str:
        url = reverse("admin:bots_llmcall_changelist") + f"?decision__id__exact={obj.pk}"
        return format_html('<a href="{}">calls</a>', url)
