"""Settings for the benchmark's gunicorn only: the service's settings plus the baseline view's route."""

from medcor_backend2.settings import *  # noqa: F403 - the usual way to extend a settings module

ROOT_URLCONF = "bench.urls"
