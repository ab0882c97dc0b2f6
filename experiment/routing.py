from django.urls import path

from experiment.consumers import ParticipantConsumer

websocket_urlpatterns = [
    path("ws/play/<str:token>/", ParticipantConsumer.as_asgi()),
]
