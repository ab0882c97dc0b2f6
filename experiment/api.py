"""The read-only REST API for staff (session or token auth): experiments, sessions, groups, participants,
choices, messages and LLM calls, filterable by ``session`` (id) and ``experiment`` (slug), paginated.

Participant tokens are never serialised: every serializer lists its fields explicitly.
"""

from __future__ import annotations

from typing import Any

from django.db.models import Count, QuerySet
from django.db.models.functions import Length
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_field, extend_schema_view
from rest_framework import serializers, viewsets
from rest_framework.authentication import SessionAuthentication, TokenAuthentication
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.pagination import PageNumberPagination
from rest_framework.permissions import IsAdminUser
from rest_framework.request import Request

from experiment import export, services
from experiment.export import ExportError, Options, Scope
from experiment.models import Choice, Condition, Experiment, Group, Message, Participant, Session


class Pages(PageNumberPagination):
    page_size = 100
    page_size_query_param = "page_size"
    max_page_size = 1000


FILTERS = [
    OpenApiParameter("session", OpenApiTypes.INT, description="Only rows of this session (id)."),
    OpenApiParameter("experiment", OpenApiTypes.STR, description="Only rows of this experiment (slug)."),
]


class StaffReadOnly(viewsets.ReadOnlyModelViewSet):
    """Staff only; filtered by ``?session=<id>`` and ``?experiment=<slug>``; ordered by id."""

    authentication_classes = [SessionAuthentication, TokenAuthentication]
    permission_classes = [IsAdminUser]
    pagination_class = Pages
    session_path = ""  # lookup from the model to its session ("" for Session itself)

    def base_queryset(self) -> QuerySet:
        raise NotImplementedError

    def get_queryset(self) -> QuerySet:
        qs = self.base_queryset()
        session = self.request.query_params.get("session")
        experiment = self.request.query_params.get("experiment")
        prefix = f"{self.session_path}__" if self.session_path else ""
        if session is not None:
            if not session.isdigit():
                raise ValidationError({"session": "A session id is a whole number."})
            qs = qs.filter(**{f"{prefix}pk" if not self.session_path else f"{self.session_path}_id": int(session)})
        if experiment is not None:
            qs = qs.filter(**{f"{prefix}experiment__slug": experiment})
        return qs.order_by("pk")


# ---- serializers -----------------------------------------------------------------------------------------

class ConditionSerializer(serializers.ModelSerializer):
    class Meta:
        model = Condition
        fields = ["id", "name", "disclose_identity", "disclose_from_round"]


class ExperimentSerializer(serializers.ModelSerializer):
    conditions = ConditionSerializer(many=True, read_only=True)

    class Meta:
        model = Experiment
        fields = ["id", "slug", "name", "created_at", "conditions", "n_selectors", "n_bot_selectors", "n_candidates",
                  "n_bot_candidates", "n_rounds", "endowment", "multiplier", "send_mode", "message_max_chars",
                  "pitch_seconds", "choice_seconds", "return_seconds", "feedback_seconds", "belief_seconds",
                  "belief_rounds", "show_public_tally", "unchosen_base", "choice_timeout", "dropout_after",
                  "dropout_policy", "lobby_timeout_seconds", "bonus_per_point", "currency", "participation_fee"]


class SessionSerializer(serializers.ModelSerializer):
    experiment = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    n_groups = serializers.IntegerField(read_only=True)
    n_participants = serializers.IntegerField(read_only=True)

    class Meta:
        model = Session
        fields = ["id", "experiment", "label", "code", "capacity", "status", "created_at", "n_groups", "n_participants"]


class GroupSerializer(serializers.ModelSerializer):
    condition = serializers.SlugRelatedField(slug_field="name", read_only=True)

    class Meta:
        model = Group
        fields = ["id", "session", "number", "condition", "status", "round_number", "phase", "created_at", "finished_at"]


class ParticipantSerializer(serializers.ModelSerializer):
    bonus = serializers.SerializerMethodField()

    class Meta:
        model = Participant
        # Never "token": it is the participant's password.
        fields = ["id", "session", "group", "seat", "role", "kind", "controller", "status", "prolific_pid", "study_id",
                  "recruitment_session_id", "quiz_attempts", "payoff", "bonus", "joined_at", "lobby_at", "finished_at"]

    @extend_schema_field(OpenApiTypes.DECIMAL)
    def get_bonus(self, p: Participant) -> str:
        return f"{services.bonus_of(p):.2f}"


class ChoiceSerializer(serializers.ModelSerializer):
    session = serializers.IntegerField(source="group.session_id", read_only=True)
    selector_seat = serializers.CharField(source="selector.seat", read_only=True)
    candidate_seat = serializers.CharField(source="candidate.seat", read_only=True, allow_null=True, default=None)
    candidate_kind = serializers.CharField(source="candidate.kind", read_only=True, allow_null=True, default=None)
    returned = serializers.SerializerMethodField()

    class Meta:
        model = Choice
        fields = ["id", "session", "group", "round_number", "selector", "selector_seat", "candidate", "candidate_seat",
                  "candidate_kind", "label_shown", "position", "order", "sent", "multiplied", "returned", "timed_out",
                  "decision_seconds", "created_at"]

    @extend_schema_field(OpenApiTypes.INT)
    def get_returned(self, c: Choice) -> int | None:
        ret = getattr(c, "return_decision", None)
        return ret.returned if ret is not None else None


class MessageSerializer(serializers.ModelSerializer):
    session = serializers.IntegerField(source="group.session_id", read_only=True)
    candidate_seat = serializers.CharField(source="candidate.seat", read_only=True)
    candidate_kind = serializers.CharField(source="candidate.kind", read_only=True)
    length = serializers.IntegerField(read_only=True)

    class Meta:
        model = Message
        fields = ["id", "session", "group", "round_number", "candidate", "candidate_seat", "candidate_kind", "text",
                  "length", "timed_out", "created_at"]


# ---- viewsets ------------------------------------------------------------------------------------------

BUNDLE_PARAMETERS = [
    OpenApiParameter("file_format", OpenApiTypes.STR, enum=list(export.FORMATS),
                     description="Format of the tables in the zip (default csv)."),
    OpenApiParameter("pseudonymise", OpenApiTypes.BOOL,
                     description="Replace recruitment ids by stable pseudonyms (HMAC of the id)."),
]


def _bundle(request: Request, scope: Scope) -> Any:
    from experiment.staff_views import bundle_response

    recruitment = "pseudonymise" if request.query_params.get("pseudonymise") in ("1", "true", "yes") else "include"
    try:
        options = Options(format=request.query_params.get("file_format", "csv"), recruitment=recruitment)  # type: ignore[arg-type]
    except ExportError as exc:
        raise ValidationError({"file_format": str(exc)}) from None
    return bundle_response(scope=scope, options=options, request=request._request)


@extend_schema_view(list=extend_schema(parameters=FILTERS))
class ExperimentViewSet(StaffReadOnly):
    serializer_class = ExperimentSerializer
    lookup_field = "slug"

    def base_queryset(self) -> QuerySet:
        return Experiment.objects.prefetch_related("conditions")

    def get_queryset(self) -> QuerySet:
        qs = self.base_queryset()
        session = self.request.query_params.get("session")
        experiment = self.request.query_params.get("experiment")
        if session is not None:
            if not session.isdigit():
                raise ValidationError({"session": "A session id is a whole number."})
            qs = qs.filter(sessions=int(session))
        if experiment is not None:
            qs = qs.filter(slug=experiment)
        return qs.order_by("pk")

    @extend_schema(parameters=BUNDLE_PARAMETERS, responses={(200, "application/zip"): OpenApiTypes.BINARY},
                   description="The data bundle (zip of tidy tables + codebook) of every session of the experiment.")
    @action(detail=True, methods=["get"], url_path="export")
    def bundle(self, request: Request, slug: str | None = None) -> Any:
        return _bundle(request, Scope.for_experiments([self.get_object().pk]))


@extend_schema_view(list=extend_schema(parameters=FILTERS))
class SessionViewSet(StaffReadOnly):
    serializer_class = SessionSerializer

    def base_queryset(self) -> QuerySet:
        return Session.objects.select_related("experiment").annotate(
            n_groups=Count("groups", distinct=True), n_participants=Count("participants", distinct=True))

    @extend_schema(parameters=BUNDLE_PARAMETERS, responses={(200, "application/zip"): OpenApiTypes.BINARY},
                   description="The data bundle (zip of tidy tables + codebook) of this session.")
    @action(detail=True, methods=["get"], url_path="export")
    def bundle(self, request: Request, pk: str | None = None) -> Any:
        return _bundle(request, Scope.for_sessions([self.get_object().pk]))


@extend_schema_view(list=extend_schema(parameters=FILTERS))
class GroupViewSet(StaffReadOnly):
    serializer_class = GroupSerializer
    session_path = "session"

    def base_queryset(self) -> QuerySet:
        return Group.objects.select_related("condition")


@extend_schema_view(list=extend_schema(parameters=FILTERS))
class ParticipantViewSet(StaffReadOnly):
    serializer_class = ParticipantSerializer
    session_path = "session"

    def base_queryset(self) -> QuerySet:
        return Participant.objects.select_related("session__experiment")


@extend_schema_view(list=extend_schema(parameters=FILTERS))
class ChoiceViewSet(StaffReadOnly):
    serializer_class = ChoiceSerializer
    session_path = "group__session"

    def base_queryset(self) -> QuerySet:
        return Choice.objects.select_related("group", "selector", "candidate", "return_decision")


@extend_schema_view(list=extend_schema(parameters=FILTERS))
class MessageViewSet(StaffReadOnly):
    serializer_class = MessageSerializer
    session_path = "group__session"

    def base_queryset(self) -> QuerySet:
        return Message.objects.select_related("group", "candidate").annotate(length=Length("text"))


LLM_CALL_FIELDS = ["id", "session", "group", "participant", "decision", "profile", "round_number", "phase", "attempt",
                   "purpose", "model", "model_reported", "parameters", "request_messages", "response_format", "raw_reply",
                   "refusal", "parsed", "tokens_in", "tokens_out", "latency_ms", "cost", "http_status", "error_class",
                   "error_message", "status", "applied", "created_at", "finished_at"]


def llm_call_viewset() -> type[StaffReadOnly] | None:
    """The LLM call endpoint, when the bots app has its LLMCall model (None otherwise)."""
    model = export.llm_call_model()
    if model is None:
        return None
    present = {f.name for f in model._meta.get_fields()}
    meta = type("Meta", (), {"model": model, "fields": [name for name in LLM_CALL_FIELDS if name in present]})
    serializer = type("LLMCallSerializer", (serializers.ModelSerializer,), {"Meta": meta, "__module__": __name__})

    def base_queryset(self: StaffReadOnly) -> QuerySet:
        return model._default_manager.all()

    viewset = type("LLMCallViewSet", (StaffReadOnly,), {
        "serializer_class": serializer, "session_path": "session", "base_queryset": base_queryset, "__module__": __name__,
        "__doc__": "Every request to a language model: messages sent, reply, model, parameters, tokens, latency, cost, "
                   "error. Staff only; filtered by ``?session=<id>`` and ``?experiment=<slug>``; ordered by id."})
    return extend_schema_view(list=extend_schema(parameters=FILTERS))(viewset)
