"""Settings shared by every environment. Environment-specific modules import from here."""

from __future__ import annotations

from pathlib import Path

from config.env import env_int, env_str

BASE_DIR = Path(__file__).resolve().parent.parent.parent

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI served from our own static files: the docs work offline
    "experiment",
    "bots",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "experiment.busy.BusyMiddleware",
]

ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STATICFILES_DIRS = [BASE_DIR / "static"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LOGIN_URL = "admin:login"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.SessionAuthentication",
        "rest_framework.authentication.TokenAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAdminUser"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "PartnerLab data API",
    "DESCRIPTION": "Read-only, staff-only access to experiments, sessions, groups, participants, choices, messages "
                   "and LLM calls. Authenticate with a staff session or `Authorization: Token <key>`. Filter lists "
                   "with `?session=<id>` and `?experiment=<slug>`; pages of 100 (`?page=`, `?page_size=` up to 1000).",
    "VERSION": "1",
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "SCHEMA_PATH_PREFIX": "/api/",
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAdminUser"],
}

# --- PartnerLab -----------------------------------------------------------------------------
# How timed work (phase deadlines, automated seats) runs: "inprocess" (the embedded default: an
# asyncio loop inside the ASGI process) or "celery" (production: Celery workers + beat).
PARTNERLAB_SCHEDULER = env_str("PARTNERLAB_SCHEDULER", "inprocess")
# How often overdue phases are swept (seconds). Bounds how late a phase closes after a restart.
PARTNERLAB_SWEEP_SECONDS = float(env_str("PARTNERLAB_SWEEP_SECONDS", "1.0"))
# Where the embedded default keeps its local files (the generated admin password). A separate
# directory per database keeps a second instance (or a test) from overwriting the first one's.
PARTNERLAB_VAR_DIR = Path(env_str("PARTNERLAB_VAR_DIR", str(BASE_DIR / "var")))
# Largest websocket frame the participant consumer accepts, in characters.
PARTNERLAB_MAX_FRAME_CHARS = env_int("PARTNERLAB_MAX_FRAME_CHARS", 8192)
# Web processes: threads for the participants' database work (consumers), and how often Python hands the
# interpreter lock between threads. Fewer threads and a 1 ms interval (Python's default is 5 ms) let the
# event loop, which acknowledges actions and forwards events, get the lock sooner while those threads
# compute (bench/load.py, 1,000 participants: phase-change p99 519 → 383 ms; docs/benchmarks.md).
PARTNERLAB_WEB_DB_THREADS = env_int("PARTNERLAB_WEB_DB_THREADS", 3)
PARTNERLAB_WEB_SWITCH_INTERVAL = float(env_str("PARTNERLAB_WEB_SWITCH_INTERVAL", "0.001"))
# Threads per web process that build seat views, apart from the threads above, so that the views a phase
# change sends never wait behind a burst of actions.
PARTNERLAB_WEB_VIEW_THREADS = env_int("PARTNERLAB_WEB_VIEW_THREADS", 2)
# Presence (experiment/presence.py): each web process marks its open participant websockets as alive this often
# (seconds), and the sweep removes those not marked for the staleness limit, so that the seats served by a killed
# or crashed web process stop showing as connected. Keep the limit at three heartbeats or more.
PARTNERLAB_PRESENCE_HEARTBEAT_SECONDS = float(env_str("PARTNERLAB_PRESENCE_HEARTBEAT_SECONDS", "10"))
PARTNERLAB_PRESENCE_STALE_SECONDS = float(env_str("PARTNERLAB_PRESENCE_STALE_SECONDS", "30"))
# Automated seats whose job was lost (a Redis restart empties the broker's queues; a retry cannot be published while
# the broker is down) get it again from the sweep once it is this many seconds overdue; the sweep looks at most
# every PARTNERLAB_REARM_EVERY_SECONDS per process (bots.automation.rearm).
PARTNERLAB_REARM_AFTER_SECONDS = float(env_str("PARTNERLAB_REARM_AFTER_SECONDS", "5"))
PARTNERLAB_REARM_EVERY_SECONDS = float(env_str("PARTNERLAB_REARM_EVERY_SECONDS", "5"))

# Where the bot profiles' limits (requests per minute, requests at once) are counted for all workers together
# (bots/limits.py). Empty on the embedded default: its one process counts them in memory.
PARTNERLAB_LIMITS_REDIS_URL = env_str("PARTNERLAB_LIMITS_REDIS_URL", "")
# The prefix of every key this deployment writes to Redis; production derives its own (config/isolation.py).
PARTNERLAB_CHANNEL_PREFIX = "partnerlab-local"

CELERY_TASK_ACKS_LATE = True
# Workers keep their database connections between tasks (config/celery.py hands them back as Django does after
# a request: to the pool in production, or when unusable or older than CONN_MAX_AGE). Celery's own fix-up would close them every N*2 task
# signals only; without this setting, around every task.
CELERY_DB_REUSE_MAX = 1_000_000
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_TIME_LIMIT = 120
CELERY_TASK_SOFT_TIME_LIMIT = 90
CELERY_BEAT_SCHEDULE = {
    "phase-sweep": {
        "task": "experiment.tasks.sweep_task",
        "schedule": 1.0,
        "options": {"expires": 5},
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "INFO"},
    "loggers": {"django.channels.server": {"level": "WARNING"}},
}
