"""The experimenter's admin: design experiments, launch sessions, read (never edit) the game data.

Designs and sessions are edited here; every write to game state goes through ``experiment.services``.
Game data (groups, seats, messages, choices, returns, payoffs, beliefs, answers, the event log) is
shown read-only: no staff user can add, change or delete it from the admin.
"""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import NON_FIELD_ERRORS, PermissionDenied, ValidationError
from django.db import models as dj_models
from django.db.models import Count, IntegerField, OuterRef, Q, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.forms.fields import InvalidJSONInput
from django.forms.models import BaseInlineFormSet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.urls import NoReverseMatch, path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from experiment import game, presets, services
from experiment.game import RuleError
from experiment.models import (
    Belief,
    Choice,
    Condition,
    Event,
    Experiment,
    Group,
    Message,
    Participant,
    QuestionnaireResponse,
    Return,
    RoundPayoff,
    Session,
)

admin.site.site_header = "PartnerLab"
admin.site.site_title = "PartnerLab admin"
admin.site.index_title = "Experiments, sessions and their data"
# The lists here are wide (per-stage counts, composition); the breadcrumbs already lead back.
admin.site.enable_nav_sidebar = False

P = Participant

# Prolific replaces these placeholders in the study URL with the participant's ids.
PROLIFIC_QUERY = "?PROLIFIC_PID={{%PROLIFIC_PID%}}&STUDY_ID={{%STUDY_ID%}}&SESSION_ID={{%SESSION_ID%}}"
PROLIFIC_COMPLETE = "https://app.prolific.com/submissions/complete?cc="

# One click selects the whole value, ready to paste.
_COPYABLE = "user-select: all; word-break: break-all; font-size: 13px; padding: 2px 4px;"


def _copyable(value: str, *, wrap: bool = True) -> SafeString:
    return format_html('<code style="{}{}">{}</code>', _COPYABLE, "" if wrap else " white-space: nowrap; word-break: normal;", value)


def _leftover_fields(model: type, listed: set[str]) -> list[str]:
    """Editable fields that no fieldset lists (e.g. added later): shown rather than silently hidden."""
    fields = [*model._meta.concrete_fields, *model._meta.many_to_many]
    return [f.name for f in fields if f.editable and not f.auto_created and f.name not in listed and not f.primary_key]


# ---- experiments --------------------------------------------------------------------------------------

class QuizField(forms.JSONField):
    """The quiz as indented JSON, and an empty box means no quiz."""

    default_error_messages = {
        "invalid": 'The quiz is not valid JSON: check the double quotes ("…"), the commas between items and the '
                   'brackets. Expected a list such as [{"question": "…", "options": ["a", "b"], "answer": "a"}], '
                   "or [] for no quiz.",
    }

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, InvalidJSONInput):
            return value
        if isinstance(value, list) and all(isinstance(item, dict) for item in value):
            # One line per key: the options of a question stay on one line, as one reads them.
            items = ["  {\n" + ",\n".join(f"    {json.dumps(k, ensure_ascii=False)}: {json.dumps(v, ensure_ascii=False)}"
                                          for k, v in item.items()) + "\n  }" for item in value]
            return "[\n" + ",\n".join(items) + "\n]" if items else "[]"
        return json.dumps(value, indent=2, ensure_ascii=False)

    def to_python(self, value: Any) -> Any:
        if value in self.empty_values:
            return []
        return super().to_python(value)


def _formfield(db_field: dj_models.Field, **kwargs: Any) -> forms.Field | None:
    if isinstance(db_field, dj_models.URLField):
        kwargs.setdefault("assume_scheme", "https")  # a pasted "app.prolific.com/…" means https
    return db_field.formfield(**kwargs)


class ExperimentForm(forms.ModelForm):
    class Meta:
        model = Experiment
        fields = "__all__"  # noqa: DJ007 -- the admin passes the fields of its fieldsets
        formfield_callback = _formfield
        field_classes = {"quiz": QuizField}
        widgets = {
            "quiz": forms.Textarea(attrs={"rows": 16, "cols": 100, "style": "font-family: monospace"}),
            "consent_text": forms.Textarea(attrs={"rows": 5, "cols": 100}),
            "instructions_text": forms.Textarea(attrs={"rows": 7, "cols": 100}),
            "belief_rounds": forms.TextInput(attrs={"size": 20}),
        }
        labels = {
            "n_selectors": "Selectors (S)", "n_bot_selectors": "of which bots",
            "n_candidates": "Candidates (C)", "n_bot_candidates": "of which bots",
            "n_rounds": "Rounds (R)", "message_max_chars": "Message limit (characters)",
            "pitch_seconds": "Pitch (s)", "choice_seconds": "Choice (s)", "return_seconds": "Return (s)",
            "feedback_seconds": "Feedback (s)", "belief_seconds": "Belief phase (s)",
            "endowment": "Endowment E (points)", "unchosen_base": "Base for an unchosen candidate (points)",
            "show_public_tally": "Show a public tally of choices in the feedback",
            "choice_timeout": "When a selector does not choose in time", "dropout_after": "Dropped after K timeouts in a row",
            "lobby_timeout_seconds": "Lobby timeout (s)", "completion_redirect_url": "Completion redirect URL",
        }

    def add_error(self, field: str | None, error: Any) -> None:
        # The model's design check may name a field this form does not show (read-only once a design is in
        # use): such a message goes to the top of the form instead of crashing it.
        if field is None and isinstance(error, ValidationError) and hasattr(error, "error_dict"):
            routed: dict[str, list[ValidationError]] = {}
            for name, errors in error.error_dict.items():
                key = name if name == NON_FIELD_ERRORS or name in self.fields else NON_FIELD_ERRORS
                routed.setdefault(key, []).extend(errors)
            error = ValidationError(routed)
        super().add_error(field, error)


class ConditionFormSet(BaseInlineFormSet):
    """The conditions are checked together: at least one, distinct names, labels within the rounds."""

    def clean(self) -> None:
        # Before the formset's own unique check, whose message ("duplicate data") says less.
        if not any(self.errors):
            self._check_design()
        super().clean()

    def _check_design(self) -> None:
        specs: list[game.ConditionSpec] = []
        for form in self.forms:
            if self.can_delete and self._should_delete_form(form):
                continue
            if form.instance.pk is None and not form.has_changed():
                continue  # an empty extra row
            keys = ("name", "disclose_identity", "disclose_from_round", "society")
            data = {**{k: getattr(form.instance, k) for k in keys}, **{k: v for k, v in form.cleaned_data.items() if k in keys}}
            specs.append(game.ConditionSpec(**data))
        problems = game.condition_problems(conditions=specs, n_rounds=self.instance.n_rounds, n_humans=self.instance.n_humans)
        if problems:
            raise ValidationError(problems)


def _design_in_use(experiment: Experiment | None) -> bool:
    """Once people have joined, the design is what their data mean: it no longer changes."""
    return bool(experiment and experiment.pk and Participant.objects.filter(session__experiment=experiment).exists())


class ConditionInline(admin.TabularInline):
    model = Condition
    formset = ConditionFormSet
    fields = ["name", "society", "disclose_identity", "disclose_from_round", "bot_profile"]
    extra = 0
    verbose_name = "condition (treatment arm)"
    verbose_name_plural = "Conditions (treatment arms): each group is assigned one, balanced across groups"

    def get_extra(self, request: HttpRequest, obj: Experiment | None = None, **kwargs: Any) -> int:
        # A new design starts with the DESIGN.md arms prefilled (see ExperimentAdmin.get_formset_kwargs).
        return 2 if obj is None else 0

    def get_fields(self, request: HttpRequest, obj: Experiment | None = None) -> list[str]:
        # Settings added to arms later appear too, rather than being silently left at their defaults.
        return [*self.fields, *_leftover_fields(Condition, {*self.fields, "experiment"})]

    def get_readonly_fields(self, request: HttpRequest, obj: Experiment | None = None) -> list[str]:
        return self.get_fields(request, obj) if _design_in_use(obj) else []

    def has_add_permission(self, request: HttpRequest, obj: Experiment | None = None) -> bool:
        return not _design_in_use(obj) and super().has_add_permission(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: Experiment | None = None) -> bool:
        return not _design_in_use(obj) and super().has_delete_permission(request, obj)


EXPERIMENT_FIELDSETS: list[tuple[str, dict[str, Any]]] = [
    ("Identity", {"fields": ["name", "slug", "created_at"]}),
    ("Group composition", {
        "description": "Each group has S selectors and C candidates; some of those seats can be bots. A group forms "
                       "when as many people as it has human seats are waiting in the lobby.",
        "fields": [("n_selectors", "n_bot_selectors"), ("n_candidates", "n_bot_candidates"), "humans_per_group"],
    }),
    ("Rounds and phases", {
        "description": "Every round runs pitch → choice → return → feedback (→ belief at the belief rounds). "
                       "A phase closes at its deadline even if someone has not acted; their default is recorded.",
        "fields": ["n_rounds", "message_max_chars", ("pitch_seconds", "choice_seconds"),
                   ("return_seconds", "feedback_seconds")],
    }),
    ("Money and amounts", {
        "description": "In points. A selector earns E − sent + returned; a chosen candidate earns sent × multiplier − "
                       "returned, an unchosen one the base.",
        "fields": ["endowment", "multiplier", "send_mode", "unchosen_base"],
    }),
    ("Belief and feedback", {
        "fields": ["show_public_tally", "belief_rounds", "belief_seconds"],
    }),
    ("Timeouts and dropouts", {
        "fields": ["choice_timeout", "dropout_after", "dropout_policy"],
    }),
    ("Lobby", {
        "fields": ["lobby_timeout_seconds"],
    }),
    ("Payment and completion", {
        "description": "Each code is shown on the end page for that outcome; register every code in the recruitment "
                       "site (Prolific: Completion codes). With a redirect URL the end page sends people back there.",
        "fields": [("bonus_per_point", "currency"), "participation_fee", "completion_code", "lobby_timeout_code",
                   "dropout_code", "completion_redirect_url"],
    }),
    ("Texts and quiz", {
        "fields": ["consent_text", "instructions_text", "quiz"],
    }),
]


def _flat(fieldsets: list[tuple[str, dict[str, Any]]]) -> set[str]:
    names: set[str] = set()
    for _, options in fieldsets:
        for entry in options["fields"]:
            names.update(entry if isinstance(entry, tuple) else (entry,))
    return names


@admin.register(Experiment)
class ExperimentAdmin(admin.ModelAdmin):
    form = ExperimentForm
    inlines = [ConditionInline]
    change_list_template = "admin/experiment/experiment/change_list.html"
    list_display = ["name", "slug", "rounds", "composition", "conditions_count", "sessions_count", "created_at"]
    search_fields = ["name", "slug"]
    prepopulated_fields = {"slug": ("name",)}
    actions = ["duplicate", "export_bundle", "export_bundle_pseudonymised"]
    save_on_top = True

    # -- layout --------------------------------------------------------------------------------------

    def formfield_for_dbfield(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        if isinstance(db_field, dj_models.URLField):
            kwargs.setdefault("assume_scheme", "https")
        return super().formfield_for_dbfield(db_field, request, **kwargs)

    def get_fieldsets(self, request: HttpRequest, obj: Experiment | None = None) -> list[tuple[str | None, dict[str, Any]]]:
        fieldsets: list[tuple[str | None, dict[str, Any]]] = [(name, dict(options)) for name, options in EXPERIMENT_FIELDSETS]
        if obj is None:  # nothing to show yet
            fieldsets[0] = ("Identity", {"fields": ["name", "slug"]})
        extra = _leftover_fields(Experiment, _flat(EXPERIMENT_FIELDSETS))
        if extra:
            fieldsets.append(("Other settings", {"fields": extra}))
        if obj is not None:
            fieldsets.append(("Sessions", {"fields": ["sessions_overview"]}))
        return fieldsets

    def get_readonly_fields(self, request: HttpRequest, obj: Experiment | None = None) -> list[str]:
        readonly = ["created_at", "humans_per_group", "sessions_overview"]
        if _design_in_use(obj):
            readonly += sorted(_flat(EXPERIMENT_FIELDSETS) - {"name", *readonly})
            readonly += _leftover_fields(Experiment, _flat(EXPERIMENT_FIELDSETS))
        return readonly

    def get_prepopulated_fields(self, request: HttpRequest, obj: Experiment | None = None) -> dict[str, tuple[str, ...]]:
        return {} if _design_in_use(obj) else self.prepopulated_fields

    def get_formset_kwargs(self, request: HttpRequest, obj: Experiment, inline: Any, prefix: str) -> dict[str, Any]:
        kwargs = super().get_formset_kwargs(request, obj, inline, prefix)
        # Only on the blank form: on POST the rows are compared with empty ones, so prefilled rows are saved.
        if isinstance(inline, ConditionInline) and obj.pk is None and request.method == "GET":
            kwargs["initial"] = [dict(c) for c in presets.PRESETS["hidden-vs-disclosed"]["conditions"]]
        return kwargs

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "",
                    extra_context: dict[str, Any] | None = None) -> HttpResponse:
        if request.method == "GET":
            experiment = self.get_object(request, object_id)
            if _design_in_use(experiment):
                messages.warning(request, "People have joined sessions of this experiment, so its design is locked: "
                                          "the data must keep meaning what they meant. To run it with other parameters, "
                                          "select it in the list and use “Duplicate experiment”.")
        return super().change_view(request, object_id, form_url, extra_context)

    # -- list ----------------------------------------------------------------------------------------

    def get_queryset(self, request: HttpRequest) -> QuerySet[Experiment]:
        return super().get_queryset(request).annotate(
            n_conditions=Count("conditions", distinct=True), n_sessions=Count("sessions", distinct=True))

    @admin.display(description="Rounds", ordering="n_rounds")
    def rounds(self, obj: Experiment) -> int:
        return obj.n_rounds

    @admin.display(description="Composition per group")
    def composition(self, obj: Experiment) -> str:
        def part(n: int, bots: int, role: str) -> str:
            return f"{n} {role}{'s' if n != 1 else ''}" + (f" ({bots} bot{'s' if bots != 1 else ''})" if bots else "")
        return (f"{part(obj.n_selectors, obj.n_bot_selectors, 'selector')} · "
                f"{part(obj.n_candidates, obj.n_bot_candidates, 'candidate')} · {obj.n_humans} human seats")

    @admin.display(description="Conditions", ordering="n_conditions")
    def conditions_count(self, obj: Experiment) -> int:
        return obj.n_conditions

    @admin.display(description="Sessions", ordering="n_sessions")
    def sessions_count(self, obj: Experiment) -> int:
        return obj.n_sessions

    @admin.display(description="Humans per group")
    def humans_per_group(self, obj: Experiment) -> str:
        if obj.pk is None:
            return "S + C − bot seats; shown once saved."
        if obj.n_humans < 1:
            return "None: every seat is a bot; groups are started by staff (cockpit or manage.py society)."
        return f"{obj.n_humans}: a group forms when {obj.n_humans} people wait in the lobby."

    @admin.display(description="Sessions of this experiment")
    def sessions_overview(self, obj: Experiment) -> SafeString:
        add = format_html('<a class="addlink" href="{}?experiment={}">Create a session for this experiment</a>',
                          reverse("admin:experiment_session_add"), obj.pk)
        rows = format_html_join(
            "", '<li><a href="{}">{}</a> — {}</li>',
            ((reverse("admin:experiment_session_change", args=[s.pk]), s.label or s.code, s.get_status_display())
             for s in obj.sessions.all()),
        )
        return format_html("<ul style='margin-left:0'>{}</ul>{}", rows, add) if rows else add

    # -- actions -------------------------------------------------------------------------------------

    @admin.action(description="Duplicate experiment (design and conditions, no sessions)", permissions=["add"])
    def duplicate(self, request: HttpRequest, queryset: QuerySet[Experiment]) -> None:
        for original in queryset:
            try:
                copy = presets.experiment_duplicate(experiment_id=original.pk)
            except ValidationError as exc:
                self.message_user(request, f"“{original}” was not copied: {' '.join(exc.messages)}", messages.ERROR)
                continue
            self.log_addition(request, copy, [{"added": {}}])
            self.message_user(request, format_html('Copied “{}” as <a href="{}">{}</a> ({}).', original,
                                                   reverse("admin:experiment_experiment_change", args=[copy.pk]),
                                                   copy.name, copy.slug), messages.SUCCESS)

    @admin.action(description="Export data (zip of CSV tables + codebook)", permissions=["view"])
    def export_bundle(self, request: HttpRequest, queryset: QuerySet[Experiment]) -> HttpResponse:
        from experiment.staff_views import experiments_bundle_response

        return experiments_bundle_response(experiment_ids=list(queryset.values_list("pk", flat=True)), request=request)

    @admin.action(description="Export data, recruitment ids replaced by stable pseudonyms", permissions=["view"])
    def export_bundle_pseudonymised(self, request: HttpRequest, queryset: QuerySet[Experiment]) -> HttpResponse:
        from experiment.staff_views import experiments_bundle_response

        return experiments_bundle_response(experiment_ids=list(queryset.values_list("pk", flat=True)), request=request,
                                           pseudonymise=True)

    # -- presets -------------------------------------------------------------------------------------

    def get_urls(self) -> list[Any]:
        return [
            path("preset/<slug:preset>/", self.admin_site.admin_view(self.preset_create_view),
                 name="experiment_experiment_preset"),
            *super().get_urls(),
        ]

    def preset_create_view(self, request: HttpRequest, preset: str) -> HttpResponse:
        """Create an experiment from a preset (POST only: creating is not a link to follow)."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not self.has_add_permission(request):
            raise PermissionDenied
        if preset not in presets.PRESETS:
            raise Http404(f"No preset {preset!r}")
        experiment = presets.experiment_create_from_preset(preset=preset)
        self.log_addition(request, experiment, [{"added": {}}])
        self.message_user(request, f"Created “{experiment.name}” from the preset with the standard parameters. "
                                   "Review them below, rename it, and save.", messages.SUCCESS)
        return HttpResponseRedirect(reverse("admin:experiment_experiment_change", args=[experiment.pk]))

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        extra_context = {
            **(extra_context or {}),
            "presets": [{"key": key, "label": p["label"], "description": p["description"],
                         "url": reverse("admin:experiment_experiment_preset", args=[key])}
                        for key, p in presets.PRESETS.items()],
            "can_add": self.has_add_permission(request),
        }
        return super().changelist_view(request, extra_context)


# ---- sessions -----------------------------------------------------------------------------------------

class SessionForm(forms.ModelForm):
    class Meta:
        model = Session
        fields = "__all__"  # noqa: DJ007 -- the admin passes the fields of its fieldsets

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        experiment = cleaned.get("experiment") or (self.instance.experiment if self.instance.experiment_id else None)
        capacity = cleaned.get("capacity")
        fill = cleaned.get("synthetic_fill_after", self.instance.synthetic_fill_after)
        # Without synthetic fill, people wait until a whole group's human seats are taken.
        if experiment is not None and capacity and fill is None and capacity < experiment.n_humans:
            self.add_error("capacity", f"A group of “{experiment}” needs {experiment.n_humans} people, so a capacity of "
                                       f"{capacity} can never start a game: raise the capacity to at least "
                                       f"{experiment.n_humans} (a multiple of {experiment.n_humans} fills whole groups).")
        return cleaned


_STATUS_BUCKETS: dict[str, list[str]] = {
    "joining": [P.Status.CONSENT, P.Status.INSTRUCTIONS, P.Status.QUIZ],
    "in lobby": [P.Status.LOBBY],
    "playing": [P.Status.PLAYING, P.Status.QUESTIONNAIRE],
    "finished": [P.Status.FINISHED],
    "left": [P.Status.DECLINED, P.Status.LOBBY_TIMEOUT, P.Status.DROPPED],
}


def _count(model: type, *conditions: Q, **filters: Any) -> Coalesce:
    """Rows of ``model`` for each session, as a subquery (no join fan-out between participants and groups)."""
    rows = model.objects.filter(*conditions, session=OuterRef("pk"), **filters).order_by().values("session")
    return Coalesce(Subquery(rows.annotate(n=Count("pk")).values("n"), output_field=IntegerField()), 0)


def _bucket_key(bucket: str) -> str:
    return "n_" + bucket.replace(" ", "_")


def _people() -> Q:
    """Human seats taken by people (synthetic demo fillers are not recruits)."""
    return Q(kind=P.Kind.HUMAN) & ~Q(controller=P.Controller.SYNTHETIC)


SESSION_FIELDSETS: list[tuple[str, dict[str, Any]]] = [
    ("Session", {"fields": ["experiment", "label", ("capacity", "over_recruitment"), "status", "synthetic_fill_after"]}),
    ("Recruitment links", {
        "description": "Paste the study URL into Prolific (“What is the URL of your study?”); Prolific fills in the "
                       "ids. Register the completion codes below in Prolific.",
        "fields": ["join_link", "prolific_study_url", "completion_for_prolific"],
    }),
    ("Progress", {"fields": ["people_summary", "groups_summary", "live_pages", "code", "created_at", "ended_at"]}),
]


@admin.register(Session)
class SessionAdmin(admin.ModelAdmin):
    form = SessionForm
    list_display = ["name", "experiment", "status", "joined", "joining", "in_lobby", "playing", "finished", "left",
                    "groups_summary"]
    list_filter = ["status", "experiment"]
    list_select_related = ["experiment"]
    search_fields = ["label", "code", "experiment__name", "experiment__slug"]
    actions = ["recruitment_open", "recruitment_pause", "recruitment_close", "export_bundle", "export_bundle_pseudonymised",
               "prolific_bonus"]

    def get_fieldsets(self, request: HttpRequest, obj: Session | None = None) -> list[tuple[str | None, dict[str, Any]]]:
        fieldsets: list[tuple[str | None, dict[str, Any]]] = [(name, dict(options)) for name, options in SESSION_FIELDSETS]
        extra = _leftover_fields(Session, _flat(SESSION_FIELDSETS))
        if extra:
            fieldsets.append(("Other settings", {"fields": extra}))
        return fieldsets

    def get_readonly_fields(self, request: HttpRequest, obj: Session | None = None) -> list[str]:
        readonly = ["join_link", "prolific_study_url", "completion_for_prolific", "people_summary", "groups_summary",
                    "live_pages", "code", "created_at", "ended_at"]
        if obj is not None and obj.participants.exists():
            readonly.append("experiment")  # its people play that design
        return readonly

    def get_queryset(self, request: HttpRequest) -> QuerySet[Session]:
        counts = {_bucket_key(bucket): _count(Participant, _people(), status__in=statuses)
                  for bucket, statuses in _STATUS_BUCKETS.items()}
        return super().get_queryset(request).annotate(
            **counts,
            n_synthetic=_count(Participant, controller=P.Controller.SYNTHETIC),
            n_groups_playing=_count(Group, status=Group.Status.PLAYING),
            n_groups_finished=_count(Group, status=Group.Status.FINISHED),
        )

    def get_form(self, request: HttpRequest, obj: Session | None = None, change: bool = False,
                 **kwargs: Any) -> type[forms.ModelForm]:
        form = super().get_form(request, obj, change, **kwargs)
        if "experiment" in form.base_fields:
            # From a session, an experiment may be looked at or created, not edited or deleted.
            widget = form.base_fields["experiment"].widget
            widget.can_change_related = widget.can_delete_related = False
        return form

    def get_object(self, request: HttpRequest, object_id: str, from_field: str | None = None) -> Session | None:
        session = super().get_object(request, object_id, from_field)
        if session is not None:
            # The links must carry the host the experimenter reached us on (the admin knows no other).
            session.join_url = request.build_absolute_uri(reverse("join", args=[session.code]))
        return session

    # -- read-only fields ----------------------------------------------------------------------------

    @admin.display(description="Join link")
    def join_link(self, obj: Session) -> str | SafeString:
        url = getattr(obj, "join_url", None)
        if obj.pk is None or url is None:
            return "Appears once the session is saved."
        return format_html('{} <a href="{}" target="_blank" rel="noopener">open</a>', _copyable(url), url)

    @admin.display(description="Prolific study URL")
    def prolific_study_url(self, obj: Session) -> str | SafeString:
        url = getattr(obj, "join_url", None)
        if obj.pk is None or url is None:
            return "Appears once the session is saved."
        return _copyable(url + PROLIFIC_QUERY)

    @admin.display(description="Completion (paste into Prolific)")
    def completion_for_prolific(self, obj: Session) -> str | SafeString:
        if obj.pk is None:
            return "Appears once the session is saved."
        e = obj.experiment
        if e.completion_redirect_url:
            redirect = format_html("At the end, participants are sent to {}", _copyable(e.completion_redirect_url))
        else:
            redirect = format_html(
                'No redirect: participants see the code and paste it into Prolific. To send them back automatically, '
                'set the <a href="{}">experiment’s</a> completion redirect URL to the completion URL above.',
                reverse("admin:experiment_experiment_change", args=[e.pk]))
        return format_html(
            "<table style='margin:0'>"
            "<tr><td>Completed the study</td><td>code {}</td><td>completion URL {}</td></tr>"
            "<tr><td>Lobby timeout (no group formed)</td><td>code {}</td><td>completion URL {}</td></tr>"
            "<tr><td>Dropped out</td><td>code {}</td><td>completion URL {}</td></tr>"
            "</table><p>{}</p>",
            _copyable(e.completion_code, wrap=False), _copyable(PROLIFIC_COMPLETE + e.completion_code),
            _copyable(e.lobby_timeout_code, wrap=False), _copyable(PROLIFIC_COMPLETE + e.lobby_timeout_code),
            _copyable(e.dropout_code, wrap=False), _copyable(PROLIFIC_COMPLETE + e.dropout_code),
            redirect,
        )

    @admin.display(description="Session", ordering="label")
    def name(self, obj: Session) -> str:
        return obj.label or obj.code

    @admin.display(description="Joined / capacity")
    def joined(self, obj: Session) -> str:
        joined = sum(getattr(obj, _bucket_key(bucket), 0) for bucket in _STATUS_BUCKETS)
        return f"{joined} / {obj.capacity}" + (f" + {obj.over_recruitment}" if obj.over_recruitment else "")

    @admin.display(description="Joining", ordering="n_joining")
    def joining(self, obj: Session) -> int:
        return obj.n_joining

    @admin.display(description="In lobby", ordering="n_in_lobby")
    def in_lobby(self, obj: Session) -> int:
        return obj.n_in_lobby

    @admin.display(description="Playing", ordering="n_playing")
    def playing(self, obj: Session) -> int:
        return obj.n_playing

    @admin.display(description="Finished", ordering="n_finished")
    def finished(self, obj: Session) -> int:
        return obj.n_finished

    @admin.display(description="Left", ordering="n_left")
    def left(self, obj: Session) -> int:
        return obj.n_left

    @admin.display(description="People (by stage)")
    def people_summary(self, obj: Session) -> str:
        if obj.pk is None:
            return "—"
        counts = {bucket: getattr(obj, _bucket_key(bucket), 0) for bucket in _STATUS_BUCKETS}
        parts = [f"{n} {bucket}" for bucket, n in counts.items()]
        total = sum(counts.values())
        text = f"{total} joined: " + ", ".join(parts)
        synthetic = getattr(obj, "n_synthetic", 0)
        return text + (f" (+ {synthetic} synthetic)" if synthetic else "")

    @admin.display(description="Groups")
    def groups_summary(self, obj: Session) -> str:
        if obj.pk is None:
            return "—"
        return f"{getattr(obj, 'n_groups_playing', 0)} playing, {getattr(obj, 'n_groups_finished', 0)} finished"

    @admin.display(description="Live pages")
    def live_pages(self, obj: Session) -> str | SafeString:
        if obj.pk is None:
            return "—"
        try:
            links = [("Live monitor", reverse("cockpit:monitor", args=[obj.pk])),
                     ("Payments", reverse("cockpit:payments", args=[obj.pk]))]
        except NoReverseMatch:
            return "—"
        return format_html_join(" · ", '<a href="{}">{}</a>', ((url, label) for label, url in links))

    # -- saving and actions --------------------------------------------------------------------------

    def save_model(self, request: HttpRequest, obj: Session, form: forms.ModelForm, change: bool) -> None:
        if change and "status" in form.changed_data:
            # The status changes through the service, so the change is logged with who made it.
            wanted, obj.status = obj.status, form.initial["status"]
            super().save_model(request, obj, form, change)
            self._status_set(request, obj, wanted)
            obj.refresh_from_db(fields=["status"])
            return
        super().save_model(request, obj, form, change)

    def has_delete_permission(self, request: HttpRequest, obj: Session | None = None) -> bool:
        # Deleting a session would delete its people and their data; only an unused one may go.
        if obj is not None and (obj.participants.exists() or obj.events.exists()):
            return False
        return super().has_delete_permission(request, obj)

    def _status_set(self, request: HttpRequest, session: Session, status: str) -> bool:
        try:
            services.session_status_set(session_id=session.pk, status=status, actor_id=request.user.pk)
        except RuleError as exc:
            self.message_user(request, f"{session}: {exc.message}", messages.ERROR)
            return False
        return True

    def _recruitment(self, request: HttpRequest, queryset: QuerySet[Session], status: str, verb: str) -> None:
        done = [str(s) for s in queryset if s.status != status and self._status_set(request, s, status)]
        if done:
            self.message_user(request, f"Recruitment {verb}: {', '.join(done)}.", messages.SUCCESS)
        else:
            self.message_user(request, f"No session changed: the selected ones were already {verb} or could not be.",
                              messages.WARNING)

    @admin.action(description="Open recruitment (new people may join)", permissions=["change"])
    def recruitment_open(self, request: HttpRequest, queryset: QuerySet[Session]) -> None:
        self._recruitment(request, queryset, Session.Status.OPEN, "opened")

    @admin.action(description="Pause recruitment (no new people; those in continue)", permissions=["change"])
    def recruitment_pause(self, request: HttpRequest, queryset: QuerySet[Session]) -> None:
        self._recruitment(request, queryset, Session.Status.PAUSED, "paused")

    @admin.action(description="Close recruitment (no new people; those in continue)", permissions=["change"])
    def recruitment_close(self, request: HttpRequest, queryset: QuerySet[Session]) -> None:
        self._recruitment(request, queryset, Session.Status.CLOSED, "closed")

    @admin.action(description="Export data (zip of CSV tables + codebook)", permissions=["view"])
    def export_bundle(self, request: HttpRequest, queryset: QuerySet[Session]) -> HttpResponse:
        from experiment.staff_views import sessions_bundle_response

        return sessions_bundle_response(session_ids=list(queryset.values_list("pk", flat=True)), request=request)

    @admin.action(description="Export data, recruitment ids replaced by stable pseudonyms", permissions=["view"])
    def export_bundle_pseudonymised(self, request: HttpRequest, queryset: QuerySet[Session]) -> HttpResponse:
        from experiment.staff_views import sessions_bundle_response

        return sessions_bundle_response(session_ids=list(queryset.values_list("pk", flat=True)), request=request,
                                        pseudonymise=True)

    @admin.action(description="Download the Prolific bonus file (one session)", permissions=["view"])
    def prolific_bonus(self, request: HttpRequest, queryset: QuerySet[Session]) -> HttpResponse | None:
        from experiment.staff_views import prolific_bonus_response

        if queryset.count() != 1:
            self.message_user(request, "Select exactly one session for its bonus file.", messages.WARNING)
            return None
        return prolific_bonus_response(session_id=queryset.get().pk)


# ---- game data: read-only ------------------------------------------------------------------------------

class ReadOnlyAdmin(admin.ModelAdmin):
    """Game data is written by the game only. Staff may look, never add, change or delete."""

    actions = None

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Group)
class GroupAdmin(ReadOnlyAdmin):
    list_display = ["__str__", "condition", "status", "round_number", "phase", "phase_deadline", "paused_at"]
    list_filter = ["status", "session"]
    list_select_related = ["session__experiment", "condition"]


@admin.register(Participant)
class ParticipantAdmin(ReadOnlyAdmin):
    # The private token opens a seat: it is never shown here.
    fields = ["session", "group", "seat", "role", "kind", "controller", "status", "payoff", "prolific_pid", "study_id",
              "recruitment_session_id", "quiz_attempts", "consecutive_timeouts", "connections", "joined_at", "lobby_at",
              "last_seen_at", "finished_at"]
    list_display = ["__str__", "session", "group_number", "seat", "role", "kind", "controller", "status", "payoff",
                    "prolific_pid", "study_id", "recruitment_session_id"]
    list_filter = ["status", "role", "kind", "controller", "session"]
    list_select_related = ["session__experiment", "group"]
    search_fields = ["prolific_pid", "study_id", "recruitment_session_id"]

    def get_fields(self, request: HttpRequest, obj: Participant | None = None) -> list[str]:
        names = {f.name for f in Participant._meta.concrete_fields}
        return [f for f in self.fields if f in names]

    @admin.display(description="Group", ordering="group__number")
    def group_number(self, obj: Participant) -> int | None:
        return obj.group.number if obj.group else None


@admin.register(Message)
class MessageAdmin(ReadOnlyAdmin):
    list_display = ["group", "round_number", "candidate", "text", "timed_out", "created_at"]
    list_filter = ["timed_out", "group__session"]
    list_select_related = ["group__session__experiment", "candidate"]


@admin.register(Choice)
class ChoiceAdmin(ReadOnlyAdmin):
    list_display = ["group", "round_number", "selector", "candidate", "position", "label_shown", "sent", "multiplied",
                    "timed_out", "decision_seconds"]
    list_filter = ["timed_out", "group__session"]
    list_select_related = ["group__session__experiment", "selector", "candidate"]


@admin.register(Return)
class ReturnAdmin(ReadOnlyAdmin):
    list_display = ["choice_id", "round_number", "candidate", "available", "returned", "timed_out", "decision_seconds"]
    list_filter = ["timed_out", "choice__group__session"]
    list_select_related = ["choice", "candidate"]

    @admin.display(description="Round", ordering="choice__round_number")
    def round_number(self, obj: Return) -> int:
        return obj.choice.round_number


@admin.register(RoundPayoff)
class RoundPayoffAdmin(ReadOnlyAdmin):
    list_display = ["participant", "round_number", "points"]
    list_filter = ["participant__session"]
    list_select_related = ["participant"]


@admin.register(Belief)
class BeliefAdmin(ReadOnlyAdmin):
    list_display = ["group", "round_number", "selector", "candidate", "guess", "confidence", "timed_out"]
    list_filter = ["guess", "timed_out", "group__session"]
    list_select_related = ["group__session__experiment", "selector", "candidate"]


@admin.register(QuestionnaireResponse)
class QuestionnaireResponseAdmin(ReadOnlyAdmin):
    list_display = ["participant", "session", "created_at"]
    list_filter = ["participant__session"]
    list_select_related = ["participant__session__experiment"]

    @admin.display(description="Session")
    def session(self, obj: QuestionnaireResponse) -> Session:
        return obj.participant.session


@admin.register(Event)
class EventAdmin(ReadOnlyAdmin):
    """The event log is append-only: it is read here, and written only by the services."""

    list_display = ["id", "created_at", "type", "session", "group", "participant", "round_number", "phase", "actor"]
    list_filter = ["type", "session"]
    list_select_related = ["session__experiment", "group__session__experiment", "participant", "actor"]
    search_fields = ["type"]
