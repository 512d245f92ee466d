"""A local stand-in for the CAPTCHA providers' siteverify: the protocol all three speak, a form-encoded
POST of secret, response and remoteip answered with JSON {"success": bool, "error-codes": [...]}."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

SECRET = "stand-in-secret"
GOOD = "token-the-widget-gave"


class Siteverify(ThreadingHTTPServer):
    """A siteverify endpoint: each of `good` passes once, any other token is refused; `mode` scripts outages."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), SiteverifyHandler)
        self.calls = []
        self.good = {GOOD}
        self.spent = set()
        # "ok", or an outage: "error" (HTTP 503), "html" (no JSON), "hang" (no answer in time).
        self.mode = "ok"
        self.url = f"http://127.0.0.1:{self.server_address[1]}/siteverify"

    def answer(self, fields):
        if fields.get("secret") != SECRET:
            return {"success": False, "error-codes": ["invalid-input-secret"]}
        token = fields.get("response", "")
        if not token:
            return {"success": False, "error-codes": ["missing-input-response"]}
        if token not in self.good:
            return {"success": False, "error-codes": ["invalid-input-response"]}
        if token in self.spent:
            return {"success": False, "error-codes": ["timeout-or-duplicate"]}
        self.spent.add(token)
        return {"success": True, "challenge_ts": "2026-01-01T00:00:00Z", "hostname": "localhost"}


class SiteverifyHandler(BaseHTTPRequestHandler):
    def do_POST(self):
        server = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        server.calls.append({"content_type": self.headers.get("Content-Type"), "body": body})
        fields = {name: values[0] for name, values in parse_qs(body).items()}
        if server.mode == "hang":
            time.sleep(2)
        if server.mode == "error":
            return self._send(503, b"<html>Service Unavailable</html>", "text/html")
        if server.mode == "html":
            return self._send(200, b"<html>Just a moment...</html>", "text/html")
        return self._send(200, json.dumps(server.answer(fields)).encode(), "application/json")

    def _send(self, code, body, content_type):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass  # the client gave up waiting (the "hang" outage)

    def log_message(self, *args):
        pass


def start_siteverify():
    """Start a stand-in on a free loopback port, serving from a thread; stop it with `stop_siteverify`."""
    server = Siteverify()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stop_siteverify(server):
    server.shutdown()
    server.server_close()
