"""Abuse controls: rate limits shared by every process, Idempotency-Key, JSON errors everywhere."""

import hashlib
import ipaddress
import json
import subprocess
import sys
import uuid

import pytest
import requests
from django.contrib.auth.models import User
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import get_resolver
from rest_framework.test import APIClient

from email_service.models import EmailRequest

from .conftest import ROOT, free_port, require_redis, service_env, wait_for
from .files import pdf_bytes

URL = "/api/email/emails/"


def fresh_client_ip():
    """An address no earlier run used, so counts left in a shared cache never carry over."""
    return str(ipaddress.IPv6Address(uuid.uuid4().int))


FORM = {"full_name": "Rate Test", "email": "rate@example.com", "message": "Hello"}


@pytest.fixture
def quiet(dispatched, media_root):
    """Record dispatches instead of publishing, and keep files in this test's folder."""


# --- rate limits across processes ---------------------------------------------------------


@pytest.fixture
def two_web_processes(transactional_db, smtp_server, tmp_path, request):
    """Two gunicorn servers (separate processes) on the test database, sharing one cache."""
    cache = request.param
    if cache == "redis":
        require_redis()
    env = service_env(
        smtp_server.port,
        RATELIMIT_ENABLE="true",
        # Per hour, not per minute: django-ratelimit's windows are aligned to the clock, and a
        # per-minute window could turn over in the middle of a test.
        EMAIL_RATELIMIT_CREATE="5/h",
        EMAIL_RATELIMIT_READ="8/h",
        # One trusted proxy: the client address comes from X-Forwarded-For, so each test run
        # can be a fresh client and the limits of earlier runs do not leak in.
        RATELIMIT_TRUSTED_PROXIES="1",
        CELERY_BROKER_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}//",  # no broker: not needed here
        DJANGO_ALLOWED_HOSTS="127.0.0.1",
    )
    if cache == "sqlite":
        env["REDIS_URL"] = ""
    servers, logs = [], []
    for index in range(2):
        port = free_port()
        log = open(tmp_path / f"web{index}.log", "wb")
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "medcor_backend2.wsgi:application",
                "--bind",
                f"127.0.0.1:{port}",
                "--workers",
                "2",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        servers.append((process, f"http://127.0.0.1:{port}"))
        logs.append(log)

    def all_up():
        try:
            # Not /healthz: it waits for the (absent) broker; the schema is not rate-limited.
            return all(requests.get(f"{url}/api/schema/", timeout=5).ok for _, url in servers)
        except requests.RequestException:
            return False

    try:
        wait_for(all_up, timeout=60, message="two gunicorn servers")
        yield [url for _, url in servers]
    finally:
        for process, _ in servers:
            process.terminate()
            process.wait(timeout=10)
        for log in logs:
            log.close()


@pytest.mark.integration
@pytest.mark.parametrize("two_web_processes", ["redis", "sqlite"], indirect=True)
def test_create_limit_holds_across_processes(two_web_processes):
    client_ip = fresh_client_ip()
    answers = []
    for attempt in range(12):
        url = two_web_processes[attempt % 2]  # alternate between the two processes
        answers.append(
            requests.post(
                f"{url}{URL}",
                json={**FORM, "message": f"attempt {attempt}"},
                timeout=10,
                headers={"X-Forwarded-For": client_ip},
            )
        )
    codes = [answer.status_code for answer in answers]
    assert codes.count(201) == 5, codes
    assert codes.count(429) == 7, codes
    limited = next(answer for answer in answers if answer.status_code == 429)
    assert limited.headers["Content-Type"] == "application/json"
    assert "throttled" in limited.json()["detail"].lower()
    assert 0 < int(limited.headers["Retry-After"]) <= 3600
    # The limit is per client: another address still gets through.
    other_ip = fresh_client_ip()
    other = requests.post(
        f"{two_web_processes[0]}{URL}", json=FORM, timeout=10, headers={"X-Forwarded-For": other_ip}
    )
    assert other.status_code == 201


@pytest.mark.integration
@pytest.mark.parametrize("two_web_processes", ["sqlite"], indirect=True)
def test_read_limit_covers_list_detail_and_statistics(two_web_processes):
    client_ip = fresh_client_ip()
    headers = {"X-Forwarded-For": client_ip}
    paths = [URL, f"{URL}statistics/", f"{URL}00000000-0000-0000-0000-000000000000/"]
    codes = [
        requests.get(f"{two_web_processes[i % 2]}{paths[i % 3]}", headers=headers, timeout=10).status_code
        for i in range(10)
    ]
    assert codes[:8].count(429) == 0, codes
    assert codes[8:] == [429, 429], codes


@pytest.mark.django_db
def test_rate_limit_switch_and_client_ip_behind_a_proxy(settings, quiet):
    from email_service.throttling import client_ip

    class Request:
        META = {"REMOTE_ADDR": "10.0.0.5", "HTTP_X_FORWARDED_FOR": "6.6.6.6, 203.0.113.9"}

    settings.RATELIMIT_TRUSTED_PROXIES = 0
    assert client_ip(Request) == "10.0.0.5"
    settings.RATELIMIT_TRUSTED_PROXIES = 1
    # The address our proxy saw, not the one the client wrote in front of it.
    assert client_ip(Request) == "203.0.113.9"
    settings.RATELIMIT_TRUSTED_PROXIES = 3
    assert client_ip(Request) == "10.0.0.5"  # fewer entries than proxies: nothing to trust


@pytest.fixture
def fresh_limits(settings, quiet):
    """Rate limits on, counted under keys of this test alone: counts in the shared cache never carry over."""
    settings.RATELIMIT_ENABLE = True
    settings.RATELIMIT_CACHE_PREFIX = f"rl-test-{uuid.uuid4().hex}:"
    return settings


@pytest.mark.parametrize(
    ("address", "counted_as"),
    [
        ("203.0.113.9", "203.0.113.9"),
        ("2001:db8:aa:bb:1:2:3:4", "2001:db8:aa:bb::/64"),
        ("2001:db8:aa:bb:ffff:ffff:ffff:ffff", "2001:db8:aa:bb::/64"),
        ("::ffff:203.0.113.9", "203.0.113.9"),  # an IPv4 client on a dual-stack socket
        ("", ""),
    ],
)
def test_clients_are_counted_by_ipv4_address_or_ipv6_64(settings, address, counted_as):
    from email_service.throttling import client_network

    class Request:
        META = {"REMOTE_ADDR": address}

    settings.RATELIMIT_TRUSTED_PROXIES = 0
    assert client_network(Request) == counted_as


@pytest.mark.django_db
def test_one_ipv6_64_shares_one_limit(fresh_limits):
    fresh_limits.EMAIL_RATELIMIT_CREATE = "3/h"
    network = ipaddress.IPv6Network((uuid.uuid4().int >> 64 << 64, 64))
    hosts = [network[1], network[0xFFFF], network[2**63 + 5], network[-1]]
    codes = [
        APIClient(REMOTE_ADDR=str(host))
        .post(URL, {**FORM, "message": f"from {host}"}, format="json")
        .status_code
        for host in hosts
    ]
    assert codes == [201, 201, 201, 429]
    # The next /64 is another client.
    neighbour = ipaddress.IPv6Network((int(network.network_address) + 2**64, 64))[1]
    assert APIClient(REMOTE_ADDR=str(neighbour)).post(URL, FORM, format="json").status_code == 201
    assert EmailRequest.objects.count() == 4


@pytest.mark.django_db
def test_ipv4_clients_are_counted_one_address_each(fresh_limits):
    fresh_limits.EMAIL_RATELIMIT_CREATE = "1/h"
    first, second = APIClient(REMOTE_ADDR="198.51.100.7"), APIClient(REMOTE_ADDR="198.51.100.8")
    assert [first.post(URL, FORM, format="json").status_code for _ in range(2)] == [201, 429]
    assert second.post(URL, FORM, format="json").status_code == 201


@pytest.mark.django_db
def test_reads_share_one_limit_and_staff_actions_have_none(fresh_limits):
    fresh_limits.EMAIL_RATELIMIT_READ = "3/h"
    fresh_limits.EMAIL_RATELIMIT_CREATE = "1/h"
    staff = User.objects.create_superuser("limits", "limits@example.com", "not-used-password-1")
    client = APIClient(REMOTE_ADDR=fresh_client_ip())
    client.force_authenticate(staff)
    row = EmailRequest.objects.create(full_name="Rate Test", email="rate@example.com")
    reads = [f"{URL}", f"{URL}statistics/", f"{URL}{row.pk}/", f"{URL}"]
    codes = [client.get(path).status_code for path in reads]
    assert codes == [200, 200, 200, 429]
    limited = client.get(f"{URL}statistics/")
    assert limited.status_code == 429
    assert "throttled" in limited.json()["detail"].lower()
    assert 0 < int(limited["Retry-After"]) <= 3600
    # Actions not listed in the viewset's throttles are never limited.
    for _ in range(3):
        assert client.patch(f"{URL}{row.pk}/", {"subject": "Edited"}, format="json").status_code == 200
        assert client.post(f"{URL}retry_failed/").status_code == 200
        assert client.post(f"{URL}{uuid.uuid4()}/cancel/").status_code == 404


@pytest.mark.django_db
def test_rate_limit_enable_false_switches_every_limit_off(fresh_limits):
    fresh_limits.RATELIMIT_ENABLE = False
    fresh_limits.EMAIL_RATELIMIT_CREATE = "1/h"
    fresh_limits.EMAIL_RATELIMIT_READ = "1/h"
    client = APIClient(REMOTE_ADDR="198.51.100.9")
    assert [client.post(URL, FORM, format="json").status_code for _ in range(3)] == [201] * 3
    assert [client.get(URL).status_code for _ in range(3)] == [200] * 3


# --- Idempotency-Key --------------------------------------------------------------------------


@pytest.mark.django_db
def test_same_key_same_body_answers_the_first_answer_once(quiet):
    client, key = APIClient(), str(uuid.uuid4())
    first = client.post(URL, FORM, format="json", HTTP_IDEMPOTENCY_KEY=key)
    second = client.post(URL, FORM, format="json", HTTP_IDEMPOTENCY_KEY=key)
    assert (first.status_code, second.status_code) == (201, 200)
    assert second.json() == first.json()
    assert EmailRequest.objects.count() == 1


@pytest.mark.django_db
def test_same_key_different_body_is_422(quiet):
    client, key = APIClient(), str(uuid.uuid4())
    assert client.post(URL, FORM, format="json", HTTP_IDEMPOTENCY_KEY=key).status_code == 201
    response = client.post(URL, {**FORM, "message": "changed"}, format="json", HTTP_IDEMPOTENCY_KEY=key)
    assert response.status_code == 422
    assert "Idempotency-Key" in response.json()["detail"]
    assert EmailRequest.objects.count() == 1


@pytest.mark.django_db
def test_same_key_with_the_same_file_is_a_repeat(quiet):
    client, key = APIClient(), str(uuid.uuid4())

    def post(content):
        upload = SimpleUploadedFile("scan.pdf", content, content_type="application/pdf")
        return client.post(
            URL, {**FORM, "file_attached": upload}, format="multipart", HTTP_IDEMPOTENCY_KEY=key
        )

    assert post(pdf_bytes()).status_code == 201
    assert post(pdf_bytes()).status_code == 200
    assert post(pdf_bytes("another letter")).status_code == 422
    assert EmailRequest.objects.count() == 1


@pytest.mark.django_db
def test_a_refused_request_frees_its_key(quiet):
    client, key = APIClient(), str(uuid.uuid4())
    assert (
        client.post(URL, {**FORM, "email": "bad"}, format="json", HTTP_IDEMPOTENCY_KEY=key).status_code == 400
    )
    assert client.post(URL, FORM, format="json", HTTP_IDEMPOTENCY_KEY=key).status_code == 201


@pytest.mark.django_db
def test_a_key_still_in_progress_is_409(quiet):
    from django.core.cache import cache

    from email_service import idempotency

    client, key = APIClient(), str(uuid.uuid4())
    first = client.post(URL, FORM, format="json", HTTP_IDEMPOTENCY_KEY=key)
    # Put the key back in the state it has while its first request is being processed.
    cache_key = "idempotency:" + hashlib.sha256(key.encode()).hexdigest()
    stored = cache.get(cache_key)
    cache.set(
        cache_key, {"fingerprint": stored["fingerprint"], "body": None}, timeout=idempotency.PENDING_TTL
    )
    response = client.post(URL, FORM, format="json", HTTP_IDEMPOTENCY_KEY=key)
    assert (first.status_code, response.status_code) == (201, 409)


@pytest.mark.django_db
def test_without_a_key_two_posts_make_two_rows(quiet):
    client = APIClient()
    assert client.post(URL, FORM, format="json").status_code == 201
    assert client.post(URL, FORM, format="json").status_code == 201
    assert EmailRequest.objects.count() == 2


# --- errors are JSON under /api/ --------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("delete", URL, 405),
        ("put", URL, 405),
        ("get", "/api/email/emails/not-a-uuid/", 404),
        ("get", "/api/nothing/", 404),
        ("post", f"{URL}statistics/", 405),
    ],
)
def test_errors_under_api_are_json(method, path, status, quiet):
    response = getattr(APIClient(), method)(path)
    assert response.status_code == status
    assert response["Content-Type"].startswith("application/json")
    assert "detail" in response.json()


@pytest.mark.parametrize("status", [400, 403, 404, 500])
def test_django_error_handlers_answer_json_under_api_and_django_pages_elsewhere(rf, status):
    handler = get_resolver().resolve_error_handler(status)
    # As Django calls them: the 4xx handlers with the exception, the 500 one with the request alone.
    kwargs = {} if status == 500 else {"exception": Exception("not shown")}
    api = handler(rf.get("/api/email/emails/x/"), **kwargs)
    assert (api.status_code, api["Content-Type"]) == (status, "application/json")
    assert set(json.loads(api.content)) == {"detail"}
    page = handler(rf.get("/contact/x/"), **kwargs)
    assert page.status_code == status
    assert page["Content-Type"].startswith("text/html")


@pytest.mark.django_db
def test_a_429_is_json_with_retry_after(settings, quiet):
    settings.RATELIMIT_ENABLE = True
    settings.EMAIL_RATELIMIT_CREATE = "2/h"
    client = APIClient(REMOTE_ADDR=fresh_client_ip())
    codes = [client.post(URL, FORM, format="json").status_code for _ in range(3)]
    assert codes == [201, 201, 429]
    response = client.post(URL, FORM, format="json")
    assert response["Content-Type"] == "application/json"
    assert int(response["Retry-After"]) > 0
    assert EmailRequest.objects.count() == 2


# --- odd bodies are 400s, never 500s ---------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("body", ['["a"]', "[5]", '"abc"', "5"])
def test_non_object_json_with_an_idempotency_key_is_a_400(body, quiet):
    response = APIClient().post(URL, data=body, content_type="application/json", HTTP_IDEMPOTENCY_KEY="k-1")
    assert response.status_code == 400
    assert response.json()
    assert EmailRequest.objects.count() == 0


@pytest.mark.django_db
def test_deeply_nested_json_is_a_400(quiet):
    body = '{"full_name": ' + "[" * 100_000 + "]" * 100_000 + "}"
    response = APIClient().post(URL, data=body, content_type="application/json")
    assert response.status_code == 400


@pytest.mark.django_db
def test_json_past_the_upload_limit_is_a_400(quiet, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 10_000
    body = '{"full_name": "x", "email": "a@example.com", "message": "' + "a" * 20_000 + '"}'
    response = APIClient().post(URL, data=body, content_type="application/json")
    assert response.status_code == 400
    assert (
        "DATA_UPLOAD_MAX_MEMORY_SIZE" in response.json()["detail"]
        or "larger than" in response.json()["detail"]
    )


@pytest.mark.django_db
def test_too_many_form_fields_is_a_400(quiet, settings):
    settings.DATA_UPLOAD_MAX_NUMBER_FIELDS = 50
    data = {**FORM, **{f"extra{i}": "x" for i in range(100)}}
    response = APIClient().post(URL, data, format="multipart")
    assert response.status_code == 400
    assert EmailRequest.objects.count() == 0


def test_a_forwarded_value_that_is_no_address_is_ignored(settings):
    from email_service.throttling import client_ip

    class Request:
        META = {"REMOTE_ADDR": "10.0.0.5", "HTTP_X_FORWARDED_FOR": "unknown"}

    settings.RATELIMIT_TRUSTED_PROXIES = 1
    assert client_ip(Request) == "10.0.0.5"
    Request.META["HTTP_X_FORWARDED_FOR"] = "203.0.113.9:51234"
    assert client_ip(Request) == "10.0.0.5"
