"""docker-compose.yml, read as docker compose reads it: the stack, its health checks, its secrets."""

import re

import pytest
import yaml

from .conftest import ROOT

APP_SERVICES = ("web", "worker", "beat")
SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASS$|TOKEN", re.IGNORECASE)
# A required variable: `${NAME}` or `${NAME:?message}`, never a default that would be a secret in the file.
REQUIRED_VARIABLE = re.compile(r"^\$\{[A-Z_][A-Z0-9_]*(:\?[^}]*)?\}$")
URL_PASSWORD = re.compile(r"^[a-z+]+://[^:/@]+:([^@]+)@")


@pytest.fixture(scope="module")
def compose():
    # safe_load understands the `<<: *app` merge keys the file uses, as docker compose does.
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def environment(service):
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def test_compose_runs_web_worker_beat_rabbitmq_postgresql_and_redis(compose):
    services = compose["services"]
    assert set(services) == {"nginx", "web", "worker", "beat", "rabbitmq", "postgres", "redis"}
    command = " ".join(services["web"]["command"].split())
    assert "gunicorn -c deploy/gunicorn.conf.py medcor_backend2.wsgi:application" in command
    # No system checks at each start: the web's `migrate` ran them before (see README).
    assert services["worker"]["command"].startswith("celery -A medcor_backend2 --skip-checks worker")
    # Neither start-up sync with other workers nor their events: the service uses neither (see README).
    assert {"--without-mingle", "--without-gossip"} <= set(services["worker"]["command"].split())
    assert services["beat"]["command"].startswith("celery -A medcor_backend2 beat")
    assert all(services[name]["image"] == services["web"]["image"] for name in APP_SERVICES)


def test_every_service_has_a_health_check_and_the_app_waits_for_healthy_backends(compose):
    for name, service in compose["services"].items():
        check = service.get("healthcheck", {})
        assert check.get("test"), f"{name} has no health check"
        assert not check.get("disable"), name
    web_check = " ".join(compose["services"]["web"]["healthcheck"]["test"])
    assert "/healthz" in web_check
    assert "inspect ping" in " ".join(compose["services"]["worker"]["healthcheck"]["test"])
    for name in APP_SERVICES:
        depends = compose["services"][name]["depends_on"]
        assert {backend: depends[backend]["condition"] for backend in ("postgres", "rabbitmq", "redis")} == {
            "postgres": "service_healthy",
            "rabbitmq": "service_healthy",
            "redis": "service_healthy",
        }


def test_nginx_is_the_only_way_in_and_the_app_trusts_exactly_that_one_proxy(compose):
    services = compose["services"]
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in services["nginx"]["volumes"]
    assert services["nginx"]["depends_on"]["web"]["condition"] == "service_healthy"
    assert [port.split(":")[-1] for port in services["nginx"]["ports"]] == ["8080"]
    assert "listen 8080;" in (ROOT / "deploy" / "nginx.conf").read_text()
    assert "ports" not in services["web"]
    for name in APP_SERVICES:
        assert environment(services[name])["RATELIMIT_TRUSTED_PROXIES"] == "1", name


def test_web_worker_and_beat_share_one_media_volume_where_media_root_points(compose):
    assert "media" in compose["volumes"]
    for name in APP_SERVICES:
        service = compose["services"][name]
        assert "media:/app/media" in service["volumes"], name
        assert environment(service)["MEDIA_ROOT"] == "/app/media", name


def test_app_services_reach_the_backends_by_their_service_names(compose):
    for name in APP_SERVICES:
        env = environment(compose["services"][name])
        assert "@postgres:5432/" in env["DATABASE_URL"]
        assert "@rabbitmq:5672/" in env["CELERY_BROKER_URL"]
        assert env["REDIS_URL"].startswith("redis://redis:6379/")


def test_no_secret_is_written_in_the_file_only_required_variables(compose):
    checked = 0
    for name, service in compose["services"].items():
        for key, value in environment(service).items():
            if SECRET_NAME.search(key):
                assert REQUIRED_VARIABLE.match(value), f"{name}.{key} holds a literal: {value!r}"
                checked += 1
            password = URL_PASSWORD.match(value)
            if password:
                assert REQUIRED_VARIABLE.match(password.group(1)), f"{name}.{key} holds a literal password"
                checked += 1
    # The Django secret key, both database and both broker passwords (as variables and inside URLs).
    assert checked >= 6


def test_every_required_variable_is_listed_in_env_example(compose):
    text = (ROOT / "docker-compose.yml").read_text()
    required = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*):\?", text))
    example = (ROOT / ".env.example").read_text()
    listed = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", example, re.MULTILINE))
    assert required == {
        "DJANGO_SECRET_KEY",
        "MEDCOR_ENCRYPTION_KEYS",
        "MEDCOR_INDEX_KEY",
        "AUDIT_HMAC_KEY",
        "POSTGRES_PASSWORD",
        "RABBITMQ_PASSWORD",
    }
    assert required <= listed


def test_the_image_runs_as_an_unprivileged_user():
    dockerfile = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
