"""Production gunicorn settings: `gunicorn -c deploy/gunicorn.conf.py medcor_backend2.wsgi`.

nginx (deploy/nginx.conf) stands in front and buffers every request body, so a worker thread only
ever sees whole requests; the limits here still hold when gunicorn is reached directly.
A `-b`/`--bind` on the command line overrides `bind` below, as gunicorn's command line does
for every setting of a config file.
"""

import os
import socket

bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:8000")

# Threads, not processes, per connection: a request waiting on the database or a slow reader
# holds one thread, and the other threads of the worker keep answering.
worker_class = "gthread"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
threads = int(os.environ.get("GUNICORN_THREADS", "8"))

# A worker silent for this long is killed and replaced; well above any request the app serves.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))
graceful_timeout = 30
# Idle keep-alive connections are closed quickly, so they do not hold threads' slots.
keepalive = 5
# Each worker listens on a socket of its own (SO_REUSEPORT), and the kernel spreads new
# connections over them. On the one socket all workers share, the worker that happened to be
# waiting took every connection of a burst: long-lived ones (nginx's upstream keepalive, or a
# load tester's) then all sat on it while the others idled, and the service answered half as many
# requests (16 connections on one of 3 workers: 467 req/s; spread over two or three: 816-905).
# On Linux, net.ipv4.tcp_migrate_req=1 hands connections still queued on a worker that stops
# (max_requests below) to the others instead of resetting them.
# The master then binds nothing itself: on_starting below checks the address first.
reuse_port = os.environ.get("GUNICORN_REUSE_PORT", "true").lower() in ("1", "true", "yes")


def on_starting(server):
    """Before any worker binds: keep reuse_port only where it spreads connections, and refuse to
    start on an address already in use.

    With reuse_port each worker binds the address after its fork, so a port in use would not stop
    the start (its workers would fail and be started again, over and over), and a second instance
    would share the port with the first without a word. One worker has nothing to spread and, with
    no listener in the master, none while it is replaced; a unix socket is a file each worker would
    replace; port 0 would give each worker a port of its own. Those listen as gunicorn does without
    it.
    """
    if not server.cfg.reuse_port:
        return
    addresses = server.cfg.address
    if server.cfg.workers < 2 or any(not isinstance(a, tuple) or not a[1] for a in addresses):
        server.cfg.set("reuse_port", False)
        return
    for host, port in addresses:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise SystemExit(f"gunicorn: cannot listen on {host}:{port}: {exc.strerror}") from None


# The request line, the number of header fields and the size of each, as nginx's
# large_client_header_buffers allows (4 x 8k): anything longer is refused with 400.
limit_request_line = 4094
limit_request_fields = 50
limit_request_field_size = 8190

# A slow leak cannot grow a worker for ever; the jitter keeps workers from restarting together.
# Each restart costs a whole Django start-up (about a second of CPU) and a cold process: at 2,000
# requests a busy worker restarted every 20 s or so, a few percent of the machine under load.
max_requests = int(os.environ.get("GUNICORN_MAX_REQUESTS", "50000"))
max_requests_jitter = max_requests // 10

# The heartbeat file on tmpfs: on a container's overlay filesystem a write can block for seconds
# and get a healthy worker killed.
if os.path.isdir("/dev/shm"):
    worker_tmp_dir = "/dev/shm"

# No runtime control socket in production: nothing should reconfigure the server from inside.
control_socket_disable = True

# GUNICORN_ACCESS_LOG="" turns the access log off (the benchmark does, to measure the app alone).
accesslog = os.environ.get("GUNICORN_ACCESS_LOG", "-") or None
errorlog = "-"
# The path without the query string (staff filters such as ?email= carry personal data), and
# neither the client's address nor the Referer (which carries a full URL with its query).
access_log_format = '%(t)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms "%(a)s"'


def post_worker_init(worker):
    """Load the URLconf's modules, then freeze what the worker holds out of the garbage collector.

    Left in the collector, the objects Django and the app leave after start-up are walked by every
    full collection: 40-48 ms each here, during which the worker answers no request (about one
    per 3,000 POSTs). Frozen (the gc module's advice for a long-lived process), a full collection
    walks only what was made since: 0.5-7 ms.
    """
    import gc

    from django.urls import get_resolver

    get_resolver().url_patterns  # noqa: B018 - imports the URLconf, the views and what they import
    gc.collect()
    gc.freeze()
