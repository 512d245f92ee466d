"""Settings for the benchmark's gunicorn only: the service's settings plus the baseline view's route."""
from medcor_backend2.settings import *

ROOT_URLCONF = "bench.urls"
