"""A real MTA for the tests: Postfix with Dovecot SASL, STARTTLS required, on loopback only.

`PostfixMTA` runs its own Postfix instance (its own config and queue directories, `postfix -c`)
and its own Dovecot (only its auth service, for Postfix's SASL), with a CA and server certificate
made for the run. Mail for the routed domains goes to an aiosmtpd sink the tests read with
`delivered()`; every other domain is refused at RCPT (`default_transport = error`), so nothing
relays out.

Gmail's replies are injected per SASL user by `check_sasl_access` at four stages (MAIL, RCPT,
DATA, end of data) through a socketmap table served from this process, so a test changes a
user's reply with `set_reply()` and the next command sees it, without a reload. Postfix reaches
Dovecot through a small proxy here, which `fail_logins_temporarily()` uses to get Postfix's
`454 4.7.0 Temporary authentication failure` at AUTH.

Users (password "<name>-password"): `sender` (no injected reply), `quota` (550 5.4.5 at MAIL),
`throttle` (421 4.7.0 at MAIL, and Postfix disconnects), `rate` (450 4.2.1 at RCPT).
"""

import os
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path

from aiosmtpd.controller import Controller

from .ports import free_port

POSTFIX = "/usr/sbin/postfix"
DOVECOT = "/usr/sbin/dovecot"
OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
DAEMON_DIRECTORY = "/usr/lib/postfix/sbin"

STAGES = ("mail", "rcpt", "data", "eod")
# Gmail's own replies (support.google.com/a/answer/3726730), preset for the users named after them.
GMAIL_QUOTA = "550 5.4.5 Daily user sending limit exceeded."
GMAIL_THROTTLE = "421 4.7.0 Try again later, closing connection."
GMAIL_RATE = (
    "450 4.2.1 The user you are trying to contact is receiving mail at a rate that prevents "
    "additional messages from being delivered."
)
GMAIL_AUTH_REQUIRED = "530 5.7.0 Authentication Required."
PRESET_REPLIES = {
    "quota": {"mail": GMAIL_QUOTA},
    "throttle": {"mail": GMAIL_THROTTLE},
    "rate": {"rcpt": GMAIL_RATE},
}
ROUTED_DOMAINS = ("tcall.ai", "example.com", "example.org", "medcor.example", "medcor.test")
# Gmail's SIZE, so a message the service thinks fits fits here too.
MESSAGE_SIZE_LIMIT = 35882577


def missing_binaries():
    """Name the programs this MTA needs that are not installed."""
    wanted = [POSTFIX, DOVECOT, OPENSSL, f"{DAEMON_DIRECTORY}/master"]
    return [path for path in wanted if not os.access(path, os.X_OK)]


def wait_until(predicate, timeout, message):
    """Poll `predicate` until it is truthy; raise TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(0.05)


def is_listening(port):
    """Tell whether something accepts TCP connections on 127.0.0.1:`port`."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# --- certificates --------------------------------------------------------------------------


@dataclass
class Certificates:
    ca_file: Path
    cert_file: Path
    key_file: Path
    other_ca_file: Path  # a CA that signed nothing here: trusting only it must refuse the server


def _openssl(*args, cwd):
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True)


def _make_ca(directory, name, subject):
    key, cert = f"{name}.key", f"{name}.pem"
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key, cwd=directory)
    _openssl(
        "req", "-x509", "-new", "-key", key, "-sha256", "-days", "2", "-subj", subject,
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-out", cert, cwd=directory,
    )  # fmt: skip
    return directory / key, directory / cert


def make_certificates(directory):
    """Create a CA, a server certificate it signs for 127.0.0.1 and localhost, and a stranger CA."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _make_ca(directory, "ca", "/CN=MedCor test CA")
    _, other_ca = _make_ca(directory, "other-ca", "/CN=Some other CA")
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "server.key", cwd=directory)
    _openssl(
        "req", "-new", "-key", "server.key", "-subj", "/CN=localhost", "-out", "server.csr", cwd=directory
    )
    (directory / "server.ext").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "authorityKeyIdentifier=keyid\n"
        "subjectKeyIdentifier=hash\n"
    )
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", ca_cert.name, "-CAkey", ca_key.name,
        "-CAcreateserial", "-days", "2", "-sha256", "-extfile", "server.ext", "-out", "server.pem",
        cwd=directory,
    )  # fmt: skip
    key_file = directory / "server.key"
    # Postfix's smtpd runs as the postfix user and reads the key after dropping root.
    os.chmod(key_file, 0o644)
    return Certificates(ca_cert, directory / "server.pem", key_file, other_ca)


# --- the socketmap table behind check_sasl_access -----------------------------------------


def _netstring(text):
    data = text.encode()
    return str(len(data)).encode() + b":" + data + b","


class _SocketmapRequestHandler(socketserver.StreamRequestHandler):
    def handle(self):
        # Postfix keeps the connection and sends netstrings "<len>:<map> <key>," one at a time.
        while True:
            length = b""
            while not length.endswith(b":"):
                byte = self.rfile.read(1)
                if not byte:
                    return
                length += byte
            body = self.rfile.read(int(length[:-1]) + 1)
            if len(body) < 2 or not body.endswith(b","):
                return
            name, _, key = body[:-1].decode(errors="replace").partition(" ")
            reply = self.server.table.lookup(name, key)
            self.wfile.write(_netstring(f"OK {reply}" if reply else "NOTFOUND "))
            self.wfile.flush()


class _SocketmapServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class ReplyTable:
    """SMTP replies per SASL user and stage, served to Postfix as a socketmap table."""

    def __init__(self):
        self._lock = threading.Lock()
        self._replies = {}
        self.lookups = []
        self.reset()

    def reset(self):
        """Go back to the preset Gmail replies and forget the lookups."""
        with self._lock:
            self._replies = {user: dict(stages) for user, stages in PRESET_REPLIES.items()}
            self.lookups = []

    def set(self, user, reply, stage="mail"):
        """Answer `user` at `stage` with `reply`, or with nothing injected when it is None."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, not {stage!r}")
        with self._lock:
            stages = self._replies.setdefault(user, {})
            if reply is None:
                stages.pop(stage, None)
            else:
                stages[stage] = reply

    def clear(self, user):
        """Inject nothing for `user` at any stage."""
        with self._lock:
            self._replies.pop(user, None)

    def lookup(self, stage, key):
        """Return the reply for SASL login `key` at `stage`, or None; remember the lookup."""
        with self._lock:
            self.lookups.append((stage, key))
            return self._replies.get(key, {}).get(stage)


# --- between Postfix and Dovecot: temporary authentication failures on demand --------------


class _AuthProxyHandler(socketserver.BaseRequestHandler):
    def handle(self):
        # Postfix speaks Dovecot's line-based auth protocol: pass it through, except that while
        # `tempfail` is set an AUTH request is answered here with a temporary failure.
        try:
            upstream = socket.create_connection(("127.0.0.1", self.server.dovecot_port), timeout=10)
        except OSError:
            return
        upstream.settimeout(None)
        threading.Thread(target=self._pump, args=(upstream, self.request), daemon=True).start()
        buffer = b""
        try:
            while chunk := self.request.recv(65536):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.startswith(b"AUTH\t") and self.server.tempfail.is_set():
                        # Postfix reads a lost connection mid-AUTH as a temporary failure.
                        self.request.shutdown(socket.SHUT_RDWR)
                        return
                    else:
                        upstream.sendall(line + b"\n")
        except OSError:
            pass
        finally:
            upstream.close()

    @staticmethod
    def _pump(source, target):
        try:
            while chunk := source.recv(65536):
                target.sendall(chunk)
        except OSError:
            pass
        finally:
            try:
                target.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _AuthProxy(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


# --- the sink Postfix delivers to ----------------------------------------------------------


@dataclass
class Delivered:
    """One message as Postfix delivered it to the sink."""

    mail_from: str
    rcpt_tos: list
    raw: bytes
    message: EmailMessage


class _SinkHandler:
    def __init__(self):
        self.messages = []
        self.condition = threading.Condition()

    async def handle_DATA(self, server, session, envelope):
        message = message_from_bytes(envelope.original_content, policy=default_policy)
        with self.condition:
            self.messages.append(
                Delivered(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content, message)
            )
            self.condition.notify_all()
        return "250 2.0.0 Ok: delivered to the test sink"


# --- Postfix and Dovecot ---------------------------------------------------------------------


class PostfixMTA:
    """One Postfix instance with Dovecot SASL under its own directory, for one test session."""

    def __init__(self, domains=ROUTED_DOMAINS):
        self.domains = tuple(domains)
        self.host = "127.0.0.1"
        self.port = None
        self.users = {}
        self.replies = ReplyTable()
        self.startup_seconds = None
        self._processes = {}
        self._socketmap = None
        self._auth_proxy = None
        self._sink = None
        self._root = None

    # -- set-up ----------------------------------------------------------------------------

    def start(self):
        """Write the configuration, start Dovecot, the reply table, the sink and Postfix."""
        started = time.monotonic()
        # Postfix's daemons run as the postfix user and must reach their queue: pytest's 0700
        # temporary directories would shut them out.
        self._root = Path(tempfile.mkdtemp(prefix="medcor-mta-"))
        os.chmod(self._root, 0o755)
        try:
            self.certificates = make_certificates(self._root / "tls")
            self.port, self.dovecot_port = free_port(), free_port()
            self._start_socketmap()
            self._start_auth_proxy()
            self._start_sink()
            self._start_dovecot()
            self._start_postfix()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def _start_socketmap(self):
        self._socketmap = _SocketmapServer(("127.0.0.1", 0), _SocketmapRequestHandler)
        self._socketmap.table = self.replies
        threading.Thread(
            target=self._socketmap.serve_forever, args=(0.1,), name="mta-socketmap", daemon=True
        ).start()

    def _start_auth_proxy(self):
        self._auth_proxy = _AuthProxy(("127.0.0.1", 0), _AuthProxyHandler)
        self._auth_proxy.dovecot_port = self.dovecot_port
        self._auth_proxy.tempfail = threading.Event()
        threading.Thread(
            target=self._auth_proxy.serve_forever, args=(0.1,), name="mta-auth-proxy", daemon=True
        ).start()

    def _start_sink(self):
        self._sink = Controller(
            _SinkHandler(), hostname="127.0.0.1", port=free_port(), data_size_limit=2 * MESSAGE_SIZE_LIMIT
        )
        self._sink.start()

    def _start_dovecot(self):
        base = self._root / "dovecot"
        for sub in ("run", "state"):
            (base / sub).mkdir(parents=True)
        os.chmod(base, 0o755)
        self._users_file = base / "users"
        self.add_user("sender", "sender-password")
        for user in PRESET_REPLIES:
            self.add_user(user, f"{user}-password")
        (base / "dovecot.conf").write_text(
            f"""\
base_dir = {base}/run
state_dir = {base}/state
instance_name = medcor-test-{self.port}
log_path = {base}/dovecot.log
protocols =
listen = 127.0.0.1
ssl = no
# Postfix has already required TLS; the link between the two is loopback.
disable_plaintext_auth = no
auth_mechanisms = plain login
# Dovecot waits 2 s after a failed login by default; the tests need the answer now.
auth_failure_delay = 0
default_internal_user = dovecot
default_login_user = dovenull
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {self._users_file}
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home=/nonexistent
}}
# Dovecot delays logins from an address after failures (up to 15 s); a closed socket turns it off.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service auth {{
  inet_listener auth-postfix {{
    address = 127.0.0.1
    port = {self.dovecot_port}
  }}
}}
"""
        )
        self._dovecot_conf = base / "dovecot.conf"
        self._start_dovecot_process()

    def _start_dovecot_process(self):
        self._processes["dovecot"] = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(self._dovecot_conf)],
            stdout=subprocess.DEVNULL,
            stderr=open(self._root / "dovecot" / "stderr.log", "ab"),
            start_new_session=True,
        )
        try:
            wait_until(lambda: self._alive("dovecot") and is_listening(self.dovecot_port), 30, "dovecot")
        except TimeoutError:
            raise RuntimeError(f"dovecot did not start:\n{self.log('dovecot')[-3000:]}") from None

    def fail_logins_temporarily(self, failing=True):
        """Make every AUTH get Postfix's "454 4.7.0 Temporary authentication failure" (or stop)."""
        # Neither obvious way gives a 454: a Dovecot passdb's internal failure reaches Postfix 3.7
        # as "code=temp_fail", which it answers with 535, and with Dovecot stopped each smtpd
        # exits ("no SASL authentication mechanisms") and the master throttles smtpd for 60 s.
        if failing:
            self._auth_proxy.tempfail.set()
        else:
            self._auth_proxy.tempfail.clear()

    def _start_postfix(self):
        config = self._root / "postfix"
        config.mkdir()
        # Postfix makes the queue's subdirectories itself, not the queue and data roots.
        (self._root / "queue").mkdir(mode=0o755)
        (self._root / "data").mkdir(mode=0o700)
        shutil.chown(self._root / "data", "postfix", "postfix")
        (config / "transport").write_text(
            "".join(f"{domain} smtp:[127.0.0.1]:{self._sink.port}\n" for domain in self.domains)
        )
        socketmap = f"socketmap:inet:127.0.0.1:{self._socketmap.server_address[1]}"
        certificates = self.certificates
        (config / "main.cf").write_text(
            f"""\
compatibility_level = 3.6
# One client per smtpd process: a process whose connection to the SASL server was cut (the 454
# switch cuts it, Dovecot drops idle ones) would answer its next AUTH with a spurious 454.
max_use = 1
queue_directory = {self._root}/queue
data_directory = {self._root}/data
daemon_directory = {DAEMON_DIRECTORY}
mail_owner = postfix
setgid_group = postdrop
maillog_file_prefixes = {self._root}
maillog_file = {self._root}/maillog
myhostname = mta.medcor.test
mydomain = medcor.test
mydestination =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
relay_domains = {" ".join(self.domains)}
transport_maps = texthash:{config}/transport
# Nothing leaves this machine: smtpd refuses at RCPT every domain not routed to the sink.
default_transport = error:5.7.1 the test MTA relays nowhere
message_size_limit = {MESSAGE_SIZE_LIMIT}
smtp_tls_security_level = none
smtpd_tls_security_level = encrypt
smtpd_tls_auth_only = yes
smtpd_tls_cert_file = {certificates.cert_file}
smtpd_tls_key_file = {certificates.key_file}
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = inet:127.0.0.1:{self._auth_proxy.server_address[1]}
# Each restriction answers at its own command, as Gmail does, instead of all at RCPT.
smtpd_delay_reject = no
smtpd_sender_restrictions = check_sasl_access {socketmap}:mail, permit_sasl_authenticated,
  check_client_access static:{{{GMAIL_AUTH_REQUIRED}}}
smtpd_relay_restrictions = permit_sasl_authenticated, reject
smtpd_recipient_restrictions = check_sasl_access {socketmap}:rcpt
smtpd_data_restrictions = check_sasl_access {socketmap}:data
smtpd_end_of_data_restrictions = check_sasl_access {socketmap}:eod
# Injected errors are the point here: no penalty delay, no disconnect for having many.
smtpd_error_sleep_time = 0
smtpd_soft_error_limit = 1000
smtpd_hard_error_limit = 1000
smtpd_client_connection_count_limit = 0
"""
        )
        services = [
            f"127.0.0.1:{self.port} inet n - n - - smtpd",
            "cleanup unix n - n - 0 cleanup",
            "qmgr unix n - n 300 1 qmgr",
            "tlsmgr unix - - n 1000? 1 tlsmgr",
            "rewrite unix - - n - - trivial-rewrite",
            "bounce unix - - n - 0 bounce",
            "defer unix - - n - 0 bounce",
            "trace unix - - n - 0 bounce",
            "verify unix - - n - 1 verify",
            "flush unix n - n 1000? 0 flush",
            "proxymap unix - - n - - proxymap",
            "proxywrite unix - - n - 1 proxymap",
            "smtp unix - - n - - smtp",
            "relay unix - - n - - smtp",
            "showq unix n - n - - showq",
            "error unix - - n - - error",
            "retry unix - - n - - error",
            "discard unix - - n - - discard",
            "anvil unix - - n - 1 anvil",
            "scache unix - - n - 1 scache",
            "postlog unix-dgram n - n - 1 postlogd",
        ]
        (config / "master.cf").write_text("\n".join(services) + "\n")
        self._postfix_config = config
        # start-fg keeps the master process a child of ours, so stopping it is certain.
        self._processes["postfix"] = subprocess.Popen(
            [POSTFIX, "-c", str(config), "start-fg"],
            stdout=open(self._root / "postfix-stdout.log", "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_until(lambda: is_listening(self.port) or not self._alive("postfix"), 60, "postfix")
        except TimeoutError:
            pass
        if not is_listening(self.port):
            raise RuntimeError(f"postfix did not start:\n{self.log('postfix')[-3000:]}")

    # -- tear-down -------------------------------------------------------------------------

    def _alive(self, name):
        process = self._processes.get(name)
        return process is not None and process.poll() is None

    def _stop_process(self, name, stop_command):
        process = self._processes.pop(name, None)
        if process is None:
            return
        if process.poll() is None:
            if stop_command:
                subprocess.run(stop_command, capture_output=True, timeout=30)
            else:
                process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        try:
            # Anything the daemon left in its process group (its own children) goes too.
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def processes(self):
        """The ids of live processes working in this instance's directory (Postfix's and Dovecot's)."""
        if self._root is None:
            return []
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cwd = os.readlink(entry / "cwd")
            except OSError:
                continue  # gone, or a zombie: nothing left to stop
            if cwd == str(self._root) or cwd.startswith(f"{self._root}/"):
                found.append(int(entry.name))
        return found

    def stop(self):
        """Stop Postfix, Dovecot, the sink and the table, and remove the directory."""
        if self._root is not None and (self._root / "postfix").exists():
            self._stop_process("postfix", [POSTFIX, "-c", str(self._root / "postfix"), "stop"])
        if self._root is not None and (self._root / "dovecot" / "dovecot.conf").exists():
            # SIGTERM to the master is what `dovecot stop` sends, without its two seconds of polling.
            self._stop_process("dovecot", None)
        if self._auth_proxy is not None:
            self._auth_proxy.shutdown()
            self._auth_proxy.server_close()
            self._auth_proxy = None
        if self._sink is not None:
            self._sink.stop()
            self._sink = None
        if self._socketmap is not None:
            self._socketmap.shutdown()
            self._socketmap.server_close()
            self._socketmap = None
        for pid in self.processes():
            # Only a daemon that outlived its master's orderly stop gets here.
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._root is not None and not os.environ.get("MEDCOR_KEEP_MTA"):
            shutil.rmtree(self._root, ignore_errors=True)

    # -- what the tests use ----------------------------------------------------------------

    def add_user(self, user, password):
        """Add or change a SASL user; Dovecot reads the file again at the next login."""
        if ":" in user or ":" in password or "\n" in user + password:
            raise ValueError("a user or password may not hold ':' or a newline")
        self.users[user] = password
        text = "".join(f"{name}:{{PLAIN}}{secret}\n" for name, secret in self.users.items())
        temporary = self._users_file.with_suffix(".new")
        temporary.write_text(text)
        os.chmod(temporary, 0o644)
        temporary.replace(self._users_file)

    def set_reply(self, user, reply, stage="mail"):
        """Answer `user`'s MAIL/RCPT/DATA/end-of-data with `reply` ("550 5.4.5 ..."); None for none."""
        self.replies.set(user, reply, stage)

    def reset(self):
        """Back to the preset replies, logins checked by Dovecot and an empty sink."""
        self.replies.reset()
        self.fail_logins_temporarily(False)
        with self._sink.handler.condition:
            self._sink.handler.messages.clear()

    @property
    def ca_file(self):
        """The PEM file of the CA that signed the server's certificate."""
        return self.certificates.ca_file

    @property
    def sink_port(self):
        """The port of the sink Postfix delivers the routed domains to."""
        return self._sink.port

    def env(self, user="sender"):
        """Environment for a worker that sends through this MTA as `user` (STARTTLS, this CA)."""
        return {
            "EMAIL_HOST": self.host,
            "EMAIL_PORT": str(self.port),
            "EMAIL_HOST_USER": user,
            "EMAIL_HOST_PASSWORD": self.users[user],
            "EMAIL_USE_TLS": "true",
            "EMAIL_USE_SSL": "false",
            # OpenSSL's default trust store, for a client that loads the default certificates.
            "SSL_CERT_FILE": str(self.ca_file),
        }

    def ssl_context(self, trust=True):
        """An ssl context that trusts this MTA's CA (or, with trust=False, only another CA)."""
        certificates = self.certificates
        return ssl.create_default_context(
            cafile=str(certificates.ca_file if trust else certificates.other_ca_file)
        )

    def delivered(self, timeout=10.0, count=1):
        """Wait for at least `count` delivered messages and return all of them, oldest first."""
        handler = self._sink.handler
        with handler.condition:
            if not handler.condition.wait_for(lambda: len(handler.messages) >= count, timeout=timeout):
                raise TimeoutError(
                    f"{len(handler.messages)} of {count} messages delivered within {timeout}s; "
                    f"maillog tail:\n{self.log('postfix')[-2000:]}"
                )
            return list(handler.messages)

    def messages(self):
        """The messages delivered so far, without waiting."""
        with self._sink.handler.condition:
            return list(self._sink.handler.messages)

    def log(self, which="postfix"):
        """The text of Postfix's maillog or Dovecot's log, for failure messages."""
        path = self._root / ("maillog" if which == "postfix" else "dovecot/dovecot.log")
        try:
            return path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
