"""REST API URLs, included under ``api/``: the read-only data endpoints, the OpenAPI schema and its docs."""

from __future__ import annotations

from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import DefaultRouter

from experiment import api

router = DefaultRouter()
router.register("experiments", api.ExperimentViewSet, basename="experiment")
router.register("sessions", api.SessionViewSet, basename="session")
router.register("groups", api.GroupViewSet, basename="group")
router.register("participants", api.ParticipantViewSet, basename="participant")
router.register("choices", api.ChoiceViewSet, basename="choice")
router.register("messages", api.MessageViewSet, basename="message")
if (llm_calls := api.llm_call_viewset()) is not None:
    router.register("llm-calls", llm_calls, basename="llm-call")

app_name = "api"
urlpatterns = [
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api:schema"), name="docs"),
    *router.urls,
]
