from django.urls import path

from experiment.consumers import MonitorConsumer, ParticipantConsumer

websocket_urlpatterns = [
    path("ws/play/<str:token>/", ParticipantConsumer.as_asgi()),
    path("ws/monitor/<int:session_id>/", MonitorConsumer.as_asgi()),
]
