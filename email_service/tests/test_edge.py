"""The edge as production runs it: Debian's nginx with deploy/nginx.conf in front of gunicorn
with deploy/gunicorn.conf.py, both on loopback, and the body limit of the first middleware."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from email_service.models import EmailRequest

from .conftest import ROOT, free_port, service_env, skip_or_fail, wait_for
from .ports import stop_process

# Small limits, so that "over the limit" is quick to send: the body may be this large.
ATTACHMENT_MAX = 256 * 1024
FORM_ALLOWANCE = 64 * 1024
LIMIT = ATTACHMENT_MAX + FORM_ALLOWANCE
URL = "/api/email/emails/"
# Every test here may reach the test database through the servers, so it must exist even when
# only one of them is run (pytest-django creates it only for tests that ask for it).
pytestmark = pytest.mark.django_db(transaction=True)
FORM = {"full_name": "Edge Test", "email": "edge@example.com", "subject": "Edge", "message": "Hello"}


class Server:
    """A subprocess logging to a file, stopped with the fixture."""

    def __init__(self, command, log_path, env=None):
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def output(self):
        return self.log_path.read_text(errors="replace")

    def stop(self):
        stop_process(self.process)
        self.log.close()


_last_answer = {}


def answers(url):
    try:
        answer = requests.get(url, timeout=5)
    except requests.RequestException as error:
        _last_answer[url] = repr(error)
        return False
    _last_answer[url] = f"{answer.status_code} {answer.text[:300]}"
    return answer.status_code == 200


@pytest.fixture(scope="module")
def gunicorn(django_db_setup, django_db_blocker, smtp_server, tmp_path_factory):
    """gunicorn with deploy/gunicorn.conf.py, its bind overridden by -b, on the test database."""
    tmp_path = tmp_path_factory.mktemp("gunicorn")
    port = free_port()
    env = service_env(
        smtp_server.port,
        DJANGO_ALLOWED_HOSTS="127.0.0.1",
        RATELIMIT_TRUSTED_PROXIES="1",
        EMAIL_ATTACHMENT_MAX_BYTES=ATTACHMENT_MAX,
        EMAIL_FORM_ALLOWANCE_BYTES=FORM_ALLOWANCE,
        # Fewer threads than the slow clients below: only nginx's buffering keeps /healthz free.
        WEB_CONCURRENCY="1",
        GUNICORN_THREADS="4",
    )
    command = [sys.executable, "-m", "gunicorn", "-c", "deploy/gunicorn.conf.py", "-b", f"127.0.0.1:{port}"]
    server = Server([*command, "medcor_backend2.wsgi"], tmp_path / "gunicorn.log", env)
    server.url, server.port = f"http://127.0.0.1:{port}", port
    try:
        try:
            wait_for(
                lambda: answers(f"{server.url}/healthz") or server.process.poll() is not None,
                timeout=60,
                message="gunicorn's /healthz",
            )
        except pytest.fail.Exception:
            pytest.fail(f"gunicorn's /healthz did not answer 200: {_last_answer}")
        if server.process.poll() is not None:
            pytest.fail(f"gunicorn exited:\n{server.output()[-3000:]}")
        yield server
    finally:
        server.stop()


def nginx_config(prefix, port, upstream_port):
    """deploy/nginx.conf with its ports, paths and user made fit for a test run as this user."""
    text = (ROOT / "deploy" / "nginx.conf").read_text()
    replacements = {
        "user nginx;": "user root;" if os.geteuid() == 0 else "",
        "listen 8080;": f"listen 127.0.0.1:{port};",
        "server web:8000;": f"server 127.0.0.1:{upstream_port};",
        "pid /var/run/nginx.pid;": f"pid {prefix}/nginx.pid;",
        "/var/cache/nginx/": f"{prefix}/",
        "error_log /dev/stderr": f"error_log {prefix}/error.log",
        "access_log /dev/stdout": f"access_log {prefix}/access.log",
        "client_max_body_size 11m;": f"client_max_body_size {LIMIT // 1024}k;",
    }
    for old, new in replacements.items():
        assert old in text, f"deploy/nginx.conf no longer has {old!r}"
        text = text.replace(old, new)
    return text


@pytest.fixture(scope="module")
def nginx(gunicorn, tmp_path_factory):
    """Debian's nginx with deploy/nginx.conf, in front of the gunicorn above."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if not binary:
        skip_or_fail("nginx is not installed (apt-get install nginx-light)")
    prefix = tmp_path_factory.mktemp("nginx")
    port = free_port()
    config = prefix / "nginx.conf"
    config.write_text(nginx_config(prefix, port, gunicorn.port))
    server = Server(
        [binary, "-c", str(config), "-p", f"{prefix}/", "-g", "daemon off;"], prefix / "stdout.log"
    )
    server.url, server.prefix = f"http://127.0.0.1:{port}", prefix
    try:
        wait_for(
            lambda: answers(f"{server.url}/nginx-health") or server.process.poll() is not None,
            timeout=30,
            message="nginx",
        )
        if server.process.poll() is not None:
            pytest.fail(f"nginx exited:\n{server.output()}\n{(prefix / 'error.log').read_text()}")
        yield server
    finally:
        server.stop()


def connect(url):
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=15)
    return sock


def read_response(sock):
    """Read one HTTP response until the server closes or its declared body is in; parse it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    headers = {key.lower(): value for key, value in headers.items()}
    length = int(headers.get("content-length", "-1"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def headers_for(length=None, chunked=False, content_type="multipart/form-data; boundary=edge"):
    lines = [f"POST {URL} HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {content_type}"]
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def send_chunked(sock, total, chunk_size=32 * 1024):
    """Send `total` bytes as HTTP chunks and the last chunk, stopping quietly if the peer closes."""
    try:
        sent = 0
        while sent < total:
            size = min(chunk_size, total - sent)
            sock.sendall(b"%x\r\n" % size + b"x" * size + b"\r\n")
            sent += size
        sock.sendall(b"0\r\n\r\n")
    except OSError:
        pass  # the server answered and closed: what these tests expect


def assert_json_413(status, headers, body):
    assert status == 413, (status, body)
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["detail"]


@pytest.mark.integration
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_nginx_refuses_an_oversized_body_with_json_413_and_gunicorn_never_sees_it(nginx, gunicorn, framing):
    before = gunicorn.output().count(f"POST {URL}")
    total = LIMIT * 3
    sock = connect(nginx.url)
    started = time.monotonic()
    if framing == "chunked":
        sock.sendall(headers_for(chunked=True))
        sender = threading.Thread(target=send_chunked, args=(sock, total))
    else:
        sock.sendall(headers_for(length=total))
        sender = threading.Thread(target=lambda: _send_quietly(sock, b"x" * total))
    sender.start()
    status, headers, body = read_response(sock)
    elapsed = time.monotonic() - started
    sender.join(timeout=30)
    sock.close()
    print(f"\nnginx 413 for a {total}-byte body ({framing}): {elapsed * 1000:.1f} ms")
    assert_json_413(status, headers, body)
    assert gunicorn.output().count(f"POST {URL}") == before


def _send_quietly(sock, data):
    try:
        sock.sendall(data)
    except OSError:
        pass


@pytest.mark.integration
def test_gunicorn_answers_413_from_the_declared_length_without_the_body_being_sent(gunicorn):
    sock = connect(gunicorn.url)
    started = time.monotonic()
    # A gigabyte declared and not one byte of it sent: only a check that reads nothing can answer.
    sock.sendall(headers_for(length=1024**3))
    status, headers, body = read_response(sock)
    elapsed = time.monotonic() - started
    sock.close()
    print(f"\ngunicorn 413 with only the headers of a 1 GiB body sent: {elapsed * 1000:.1f} ms")
    assert_json_413(status, headers, body)
    assert str(LIMIT) in json.loads(body)["detail"]


@pytest.mark.integration
def test_gunicorn_cuts_off_a_chunked_body_at_the_limit(gunicorn):
    sock = connect(gunicorn.url)
    sock.sendall(headers_for(chunked=True))
    sender = threading.Thread(target=send_chunked, args=(sock, LIMIT * 4))
    sender.start()
    status, headers, body = read_response(sock)
    sender.join(timeout=30)
    sock.close()
    assert_json_413(status, headers, body)


@pytest.mark.integration
def test_a_chunked_body_under_the_limit_reaches_the_view_whole(gunicorn):
    message = "".join(f"{index:05d}" for index in range(1800))  # 9,000 characters, each place known
    payload = json.dumps({**FORM, "message": message}).encode()
    sock = connect(gunicorn.url)
    sock.sendall(headers_for(chunked=True, content_type="application/json"))
    for start in range(0, len(payload), 7000):
        part = payload[start : start + 7000]
        sock.sendall(b"%x\r\n" % len(part) + part + b"\r\n")
    sock.sendall(b"0\r\n\r\n")
    status, _, body = read_response(sock)
    sock.close()
    assert status == 201, body
    row = EmailRequest.objects.get(pk=json.loads(body)["email_request_id"])
    assert row.message == message


@pytest.mark.integration
def test_nginx_sets_the_client_address_so_one_trusted_proxy_holds(nginx):
    # A client's own X-Forwarded-For is replaced, not appended to, so it cannot pose as another.
    answer = requests.post(
        f"{nginx.url}{URL}", json=FORM, headers={"X-Forwarded-For": "203.0.113.9"}, timeout=15
    )
    assert answer.status_code == 201, answer.text
    assert EmailRequest.objects.get(pk=answer.json()["email_request_id"]).client_ip == "127.0.0.1"


@pytest.mark.integration
def test_access_logs_carry_the_path_without_the_query_string(nginx, gunicorn):
    marker = "edge-marker@example.com"
    assert requests.get(f"{nginx.url}/healthz", params={"email": marker}, timeout=10).status_code == 200
    wait_for(lambda: "/healthz" in (nginx.prefix / "access.log").read_text(), timeout=10, message="nginx log")
    wait_for(lambda: "GET /healthz HTTP/1" in gunicorn.output(), timeout=10, message="gunicorn access log")
    assert marker.split("@")[0] not in (nginx.prefix / "access.log").read_text()
    assert marker.split("@")[0] not in gunicorn.output()


def slow_upload(url, stop, progress, total=2 * LIMIT // 3, step=2048, pause=0.1):
    """Send a multipart body a little at a time (about 20 KB/s) until `stop` is set or it is all sent."""
    sock = connect(url)
    try:
        sock.sendall(headers_for(length=total))
        sent = 0
        while sent < total and not stop.is_set():
            sock.sendall(b"x" * min(step, total - sent))
            sent += step
            progress[threading.get_ident()] = sent
            stop.wait(pause)
    except OSError:
        pass
    finally:
        sock.close()


class SlowUploads:
    """Six clients uploading slowly, from when they have all started until the block ends."""

    def __init__(self, url, count=6):
        self.stop, self.progress = threading.Event(), {}
        self.threads = [
            threading.Thread(target=slow_upload, args=(url, self.stop, self.progress)) for _ in range(count)
        ]

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        wait_for(lambda: len(self.progress) == len(self.threads), timeout=10, message="every upload to start")
        return self

    def all_running(self):
        return all(thread.is_alive() for thread in self.threads)

    def __exit__(self, *exc_info):
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=10)


@pytest.mark.integration
def test_healthz_answers_within_a_second_while_six_clients_upload_slowly(nginx):
    times = []
    with SlowUploads(nginx.url) as uploads:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            started = time.monotonic()
            answer = requests.get(f"{nginx.url}/healthz", timeout=10)
            times.append(time.monotonic() - started)
            assert answer.status_code == 200, answer.text
            assert uploads.all_running(), "an upload ended early"
            time.sleep(0.1)
    print(f"\n/healthz during six slow uploads: {len(times)} calls, worst {max(times) * 1000:.1f} ms")
    # The one bound on time in these tests: it is the feature.
    assert max(times) < 1.0


@pytest.mark.integration
def test_without_nginx_six_slow_uploads_hold_every_gunicorn_thread(gunicorn):
    """The contrast that shows where the bound above comes from: nginx's buffering."""
    with SlowUploads(gunicorn.url) as uploads:
        # Four threads, six uploads that each need ten seconds: /healthz waits behind them.
        with pytest.raises(requests.Timeout):
            requests.get(f"{gunicorn.url}/healthz", timeout=3)
        assert uploads.all_running()


def test_the_middleware_refuses_a_declared_length_over_the_limit_before_the_view(client, settings):
    settings.EMAIL_ATTACHMENT_MAX_BYTES = ATTACHMENT_MAX
    settings.EMAIL_FORM_ALLOWANCE_BYTES = FORM_ALLOWANCE
    answer = client.post(URL, data=b"{}", content_type="application/json", CONTENT_LENGTH=str(LIMIT + 1))
    assert answer.status_code == 413
    assert answer.json() == {"detail": f"The request body is larger than {LIMIT} bytes."}


def test_the_middleware_lets_a_body_at_the_limit_through(client, settings, dispatched):
    settings.EMAIL_ATTACHMENT_MAX_BYTES = ATTACHMENT_MAX
    settings.EMAIL_FORM_ALLOWANCE_BYTES = FORM_ALLOWANCE
    body = json.dumps(FORM).encode()
    body += b" " * (LIMIT - len(body))  # whitespace after the JSON: exactly the limit
    answer = client.post(URL, data=body, content_type="application/json")
    assert answer.status_code == 201, answer.content


def _listening_sockets(port):
    """Listening TCP sockets on `port` (IPv4), read from /proc/net/tcp: one per worker with reuse_port."""
    lines = (Path("/proc/net/tcp").read_text().splitlines())[1:]
    return sum(1 for line in lines if line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A")


def test_gunicorn_gives_each_worker_its_listening_socket_and_refuses_a_port_in_use(
    smtp_server, tmp_path, transactional_db
):
    if not Path("/proc/net/tcp").exists():
        skip_or_fail("no /proc/net/tcp to count listening sockets on")
    port = free_port()
    env = service_env(smtp_server.port, DJANGO_ALLOWED_HOSTS="127.0.0.1", WEB_CONCURRENCY="2")
    command = [sys.executable, "-m", "gunicorn", "-c", "deploy/gunicorn.conf.py", "-b", f"127.0.0.1:{port}"]
    first = Server([*command, "medcor_backend2.wsgi"], tmp_path / "first.log", env)
    try:
        wait_for(
            lambda: answers(f"http://127.0.0.1:{port}/healthz"), timeout=60, message="gunicorn's /healthz"
        )
        # Two workers, two sockets the kernel spreads connections over (the master holds none).
        wait_for(lambda: _listening_sockets(port) == 2, timeout=10, message="a socket per worker")
        # A second server on the same address stops at once, as gunicorn does without reuse_port.
        second = subprocess.run(
            [*command, "medcor_backend2.wsgi"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
        assert second.returncode == 1
        assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in second.stderr
        assert answers(f"http://127.0.0.1:{port}/healthz")
    finally:
        first.stop()
