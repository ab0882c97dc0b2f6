from django.contrib import admin
from django.urls import include, path

from experiment import views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("cockpit/", include("experiment.cockpit_urls")),
    path("staff/", include("experiment.staff_urls")),
    path("api/", include("experiment.api_urls")),
    path("join/<str:code>/", views.join, name="join"),
    path("play/<str:token>/", views.play, name="play"),
    path("healthz", views.health, name="health"),
]
