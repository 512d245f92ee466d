"""Free TCP ports on loopback for the servers the tests start, and stopping those servers."""

import socket
import subprocess
import threading

_handed_out = set()
_lock = threading.Lock()


def free_port():
    """Return a port on 127.0.0.1 that nothing listens on now and that no earlier call returned.

    The kernel may hand a just-released port out again, so two servers asked for in a row (Postfix
    and its Dovecot, say) could otherwise get the same one.
    """
    with _lock:
        while True:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            if port not in _handed_out:
                _handed_out.add(port)
                return port


def stop_process(process, timeout=15):
    """Stop a server the tests started: SIGTERM, then SIGKILL if it has not exited in `timeout` s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
