"""Django settings of the peer: production-like (DEBUG off, persistent connections), lean.

The bench passes the secret key and the database path in the environment, so
nothing secret is committed. The middleware, apps, authentication and
renderers are cut to what an API-key-only JSON service needs: every cut makes
the peer faster, so the comparison never flatters tokenservice.
"""

import os

SECRET_KEY = os.environ["BENCH_DRF_SECRET_KEY"]
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "rest_framework",
    "rest_framework_api_key",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
]
ROOT_URLCONF = "bench.peer_drf.urls"
WSGI_APPLICATION = "bench.peer_drf.wsgi.application"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ["BENCH_DRF_DATABASE"],
        # Persistent connections: each gunicorn worker keeps its connection across
        # requests instead of opening one per request (Django's default, 0).
        "CONN_MAX_AGE": 600,
        # What Django's docs advise for SQLite in production.
        "OPTIONS": {"init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
                    "transaction_mode": "IMMEDIATE"},
    }
}
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
REST_FRAMEWORK = {
    # The API key is the only credential: no session or basic authentication to try.
    "DEFAULT_AUTHENTICATION_CLASSES": [],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework_api_key.permissions.HasAPIKey"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "UNAUTHENTICATED_USER": None,
}
