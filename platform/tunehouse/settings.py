"""Tunehouse settings: every value comes from an environment variable with an embedded default.

The defaults run the whole platform on one laptop (SQLite, a local storage folder, a private Redis started by
`make up`); production sets DATABASE_URL, REDIS_URL, S3_* and DEBUG=false.
"""

import secrets
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent.parent

env = environ.Env()

DEBUG = env.bool("DEBUG", default=True)

# Everything the platform writes on a laptop (database, stored objects, the development secret) lives here.
DATA_DIR = Path(env.str("TUNEHOUSE_DATA_DIR", default=str(BASE_DIR / "var"))).resolve()
DATA_DIR.mkdir(parents=True, exist_ok=True)


def _development_secret_key() -> str:
    """A random key generated once and kept in DATA_DIR, so sessions survive restarts without a committed secret."""
    key_file = DATA_DIR / "secret_key"
    if not key_file.exists():
        key_file.write_text(secrets.token_urlsafe(64))
        key_file.chmod(0o600)
    return key_file.read_text().strip()


SECRET_KEY = env.str("SECRET_KEY", default="")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is false.")
    SECRET_KEY = _development_secret_key()

ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]"] if DEBUG else [])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    # Swagger UI's files served from this server: the API docs work offline, with no CDN.
    "drf_spectacular_sidecar",
    "channels",
    # htmx for partial page updates, served from the wheel (no CDN).
    "django_htmx",
    "apps.core",
    "apps.tenancy",
    "apps.datasets",
    "apps.catalog",
    "apps.jobs",
    "apps.webhooks",
    "apps.endpoints",
    "apps.tuning",
    "apps.audits",
    "apps.dashboard",
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
    "apps.tenancy.middleware.ActiveTenantMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "tunehouse.urls"
ASGI_APPLICATION = "tunehouse.asgi.application"

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
                "apps.tenancy.context_processors.active_tenant",
            ],
        },
    },
]

# SQLite by default (a file in DATA_DIR); PostgreSQL or any other engine through DATABASE_URL.
DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{DATA_DIR / 'db.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The web process and the workers write the same file: WAL lets readers run beside a writer, IMMEDIATE
    # transactions take the write lock up front instead of failing halfway, and the timeout waits for it.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {"init_command": "PRAGMA journal_mode=WAL;", "transaction_mode": "IMMEDIATE", "timeout": 30}
    )
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / "test-db.sqlite3")}
DATABASES["default"]["CONN_MAX_AGE"] = env.int("DB_CONN_MAX_AGE", default=0)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env.str("REDIS_URL", default="redis://127.0.0.1:6379/0")

CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        # channels-redis blocks on Redis for up to 5 s per receive; redis-py 8 times out socket reads after 5 s by
        # default, which broke idle websockets every 5 s. A longer read timeout keeps them open.
        "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": 15}], "prefix": "tunehouse:channels"},
    }
}

# Object storage: a local folder unless S3_BUCKET is set (then S3 through boto3). workers/storage.py reads the same
# variables, so a worker on another machine finds the same objects.
STORAGE_DIR = env.str("STORAGE_DIR", default=str(DATA_DIR / "storage"))
S3_BUCKET = env.str("S3_BUCKET", default="")
S3_ENDPOINT_URL = env.str("S3_ENDPOINT_URL", default="")
S3_ACCESS_KEY_ID = env.str("S3_ACCESS_KEY_ID", default="")
S3_SECRET_ACCESS_KEY = env.str("S3_SECRET_ACCESS_KEY", default="")
S3_REGION = env.str("S3_REGION", default="us-east-1")

# Where workers unpack models and data they are working on; safe to delete.
WORK_DIR = Path(env.str("TUNEHOUSE_WORK_DIR", default=str(DATA_DIR / "work")))
# Pretrained base models as plain safetensors folders (converted once from their wheels by `prepare_catalog`). Kept
# outside DATA_DIR by default so test sessions, which each get a fresh DATA_DIR, share one conversion.
MODEL_CACHE_DIR = Path(env.str("TUNEHOUSE_MODEL_CACHE_DIR", default=str(BASE_DIR / "var" / "model-cache")))

MAX_UPLOAD_BYTES = env.int("MAX_UPLOAD_BYTES", default=512 * 1024 * 1024)

# Jobs. A tenant runs at most this many jobs at once (Tenant.max_running_jobs overrides it); more wait queued.
MAX_RUNNING_JOBS_PER_TENANT = env.int("MAX_RUNNING_JOBS_PER_TENANT", default=2)
# An executor refreshes its job's lease every JOB_HEARTBEAT_SECONDS; a lease not refreshed for JOB_LEASE_SECONDS
# belongs to a dead worker, and the job is queued again to resume from its last checkpoint.
JOB_HEARTBEAT_SECONDS = env.float("JOB_HEARTBEAT_SECONDS", default=5.0)
JOB_LEASE_SECONDS = env.float("JOB_LEASE_SECONDS", default=60.0)
# How often each worker looks for expired leases and queued jobs to send (cheap, idempotent under row locks).
JOB_RECOVERY_INTERVAL_SECONDS = env.float("JOB_RECOVERY_INTERVAL_SECONDS", default=10.0)
# A job sent to the broker but not picked up after this long is sent again (a message lost with a Redis restart).
JOB_REDISPATCH_SECONDS = env.float("JOB_REDISPATCH_SECONDS", default=900.0)
# Checkpoint interval of a job that sets none: a crash or a pause loses at most this much training.
JOB_DEFAULT_CHECKPOINT_EVERY_STEPS = env.int("JOB_DEFAULT_CHECKPOINT_EVERY_STEPS", default=100)
# Attempts a job gets when the platform's own parts fail under it (database, broker, store); its own errors fail once.
JOB_MAX_ATTEMPTS = env.int("JOB_MAX_ATTEMPTS", default=3)
# Webhooks (apps/webhooks). A failed delivery is tried again after WEBHOOK_RETRY_BASE_SECONDS x 5^(attempt - 1),
# at most an hour apart, up to WEBHOOK_MAX_ATTEMPTS tries in all; each POST waits WEBHOOK_TIMEOUT_SECONDS at most.
WEBHOOK_RETRY_BASE_SECONDS = env.float("WEBHOOK_RETRY_BASE_SECONDS", default=5.0)
WEBHOOK_MAX_ATTEMPTS = env.int("WEBHOOK_MAX_ATTEMPTS", default=8)
WEBHOOK_TIMEOUT_SECONDS = env.float("WEBHOOK_TIMEOUT_SECONDS", default=10.0)
# True suits one self-hosted machine, where the receiver often runs on the same host or LAN. Set it false when
# tenants are not trusted with the server's network: webhook URLs resolving to loopback, private, link-local or
# other non-public addresses are then refused when the endpoint is created and again when each POST connects.
WEBHOOK_ALLOW_PRIVATE_NETWORKS = env.bool("WEBHOOK_ALLOW_PRIVATE_NETWORKS", default=True)
# Inference endpoints (apps/endpoints). The serving processes (workers/serving) are reached at SERVING_URL, one URL
# or a comma-separated list (each endpoint is routed by rendezvous hashing, failing over to the next process; see
# apps/endpoints/routing.py), with the shared SERVING_TOKEN in `X-Serving-Token`; the registry of deployments lives
# in Redis (REDIS_URL). A process that could not be reached is passed over for SERVING_FAILURE_BACKOFF_SECONDS.
SERVING_URL = env.str("SERVING_URL", default="")
SERVING_FAILURE_BACKOFF_SECONDS = env.float("SERVING_FAILURE_BACKOFF_SECONDS", default=5.0)
SERVING_TOKEN = env.str("SERVING_TOKEN", default="")
SERVING_TIMEOUT_SECONDS = env.float("SERVING_TIMEOUT_SECONDS", default=300.0)
# Requests per minute (per API key and per tenant) and tokens per minute and per day (per tenant), counted in Redis
# windows. INFERENCE_TENANT_LIMITS overrides them per tenant slug, as JSON: {"acme": {"tokens_per_day": 1000}}.
INFERENCE_REQUESTS_PER_MINUTE_PER_KEY = env.int("INFERENCE_REQUESTS_PER_MINUTE_PER_KEY", default=600)
INFERENCE_REQUESTS_PER_MINUTE_PER_TENANT = env.int("INFERENCE_REQUESTS_PER_MINUTE_PER_TENANT", default=1200)
INFERENCE_TOKENS_PER_MINUTE_PER_TENANT = env.int("INFERENCE_TOKENS_PER_MINUTE_PER_TENANT", default=200_000)
INFERENCE_TOKENS_PER_DAY_PER_TENANT = env.int("INFERENCE_TOKENS_PER_DAY_PER_TENANT", default=20_000_000)
INFERENCE_TENANT_LIMITS = env.json("INFERENCE_TENANT_LIMITS", default={})
# Bounds on one request: generated tokens (also never past the model's context), prompt characters (checked before
# any tokenisation), choices per request and inputs per predict call.
INFERENCE_MAX_TOKENS = env.int("INFERENCE_MAX_TOKENS", default=2048)
INFERENCE_MAX_PROMPT_CHARS = env.int("INFERENCE_MAX_PROMPT_CHARS", default=32_000)
INFERENCE_MAX_N = env.int("INFERENCE_MAX_N", default=8)
INFERENCE_MAX_PREDICT_INPUTS = env.int("INFERENCE_MAX_PREDICT_INPUTS", default=64)
# GET /metrics (Prometheus): `Authorization: Bearer <METRICS_TOKEN>`; when unset, answered to loopback callers only.
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")
# A gzip'd upload is decompressed as a stream; past this many bytes it is refused (a gzip bomb stops here).
DATASET_MAX_DECOMPRESSED_BYTES = env.int("DATASET_MAX_DECOMPRESSED_BYTES", default=10 * 1024**3)
# Uploads go to a temp file past this size instead of memory, so the web process stays flat for big files.
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024
DATA_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "dashboard:login"
LOGIN_REDIRECT_URL = "dashboard:home"
LOGOUT_REDIRECT_URL = "dashboard:login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)  # whitenoise warns on a missing folder before the first collectstatic
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if not DEBUG
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
WHITENOISE_USE_FINDERS = DEBUG
STATICFILES_FINDERS = [
    "django.contrib.staticfiles.finders.FileSystemFinder",
    "django.contrib.staticfiles.finders.AppDirectoriesFinder",
    # plotly.js from the pinned plotly wheel (see apps/dashboard/vendor_static.py)
    "apps.dashboard.vendor_static.VendoredPackageFinder",
]

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "apps.tenancy.authentication.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["apps.tenancy.permissions.IsTenantMember"],
    "DEFAULT_PARSER_CLASSES": [
        "rest_framework.parsers.JSONParser",
        "rest_framework.parsers.MultiPartParser",
        "rest_framework.parsers.FormParser",
    ],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "EXCEPTION_HANDLER": "apps.core.api.errors.openai_exception_handler",
    "DEFAULT_CONTENT_NEGOTIATION_CLASS": "apps.core.api.negotiation.AlwaysJsonNegotiation",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}

# The OpenAPI schema (/v1/openapi.json) and its docs page (/v1/docs). Both are public: they describe the code every
# installation runs (no tenant data, nothing that differs per deployment), and a client author reads them before
# holding a key. Every operation inside still requires one.
SPECTACULAR_SETTINGS = {
    "TITLE": "Tunehouse API",
    "DESCRIPTION": "OpenAI-compatible fine-tuning API (files, fine-tuning jobs, models) plus Tunehouse extensions.",
    "VERSION": "1",
    "SCHEMA_PATH_PREFIX": "/v1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    # The session only: a stale or wrong API key must not turn public docs into a 401, and the dashboard's template
    # context (rendered into the docs page) needs the same user as the session it comes from.
    "SERVE_AUTHENTICATION": ["rest_framework.authentication.SessionAuthentication"],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
}

# Celery: JSON only, late acks so a worker that dies mid-task leaves the task for another, one task prefetched at a
# time (training holds an accelerator), and a visibility timeout longer than the longest task so Redis does not
# hand a running task to a second worker.
CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": env.int("CELERY_VISIBILITY_TIMEOUT", default=12 * 3600)}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_DEFAULT_QUEUE = "cpu"
CELERY_TASK_ROUTES = {
    "workers.tasks.datasets.*": {"queue": "cpu"},
    "workers.tasks.webhooks.*": {"queue": "cpu"},
    "workers.tasks.preparation.*": {"queue": "cpu"},
    "workers.tasks.tuning.*": {"queue": "cpu"},
    "workers.tasks.training.*": {"queue": "gpu"},
}
CELERY_TASK_ALWAYS_EAGER = False

SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False  # the dashboard's fetch() calls read the token from the cookie
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
if not DEBUG:
    # Production sits behind TLS: these make `manage.py check --deploy` pass with no warning.
    SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=True)
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_REDIRECT_EXEMPT = [r"^healthz$"]

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
}
