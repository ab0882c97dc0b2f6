from django.contrib import admin

from experiment import models

admin.site.register(models.Experiment)
admin.site.register(models.Session)
