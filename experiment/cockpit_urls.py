from django.urls import path

from experiment import cockpit_views as views

app_name = "cockpit"
urlpatterns = [
    path("", views.session_list, name="sessions"),
    path("sessions/<int:session_id>/", views.monitor, name="monitor"),
    path("sessions/<int:session_id>/end/", views.session_end, name="session-end"),
    path("sessions/<int:session_id>/society/", views.society_start, name="society-start"),
    path("sessions/<int:session_id>/payments/", views.payments, name="payments"),
    path("sessions/<int:session_id>/spend/", views.spend, name="spend"),
    path("groups/<int:group_id>/<str:action>/", views.group_action, name="group-action"),
    path("participants/<int:participant_id>/<str:action>/", views.participant_action, name="participant-action"),
]
