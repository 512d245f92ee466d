"""The keys of encryption at rest, as settings reads them: their format and development keys."""

import base64
import binascii
import os
from pathlib import Path

KEY_HOWTO = (
    'make one with: python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"'
)
DEVELOPMENT_KEYS = ("MEDCOR_ENCRYPTION_KEYS", "MEDCOR_INDEX_KEY")


def generate_key():
    """Return a new key: 32 random bytes in url-safe base64, the format of a Fernet key."""
    return base64.urlsafe_b64encode(os.urandom(32)).decode("ascii")


def is_key(text):
    """Tell whether `text` is 32 bytes in url-safe base64."""
    try:
        return len(base64.b64decode(text.strip().encode("ascii"), altchars=b"-_", validate=True)) == 32
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return False


def development_keys(path):
    """Return the development keys kept in `path`, making them the first time.

    Web, worker and beat may start at once: the file is written aside and linked into place, so
    exactly one set of keys wins and every process reads that one.
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f".{path.name}.{os.getpid()}")
        draft.write_text("".join(f"{name}={generate_key()}\n" for name in DEVELOPMENT_KEYS))
        draft.chmod(0o600)
        try:
            os.link(draft, path)
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {name.strip(): value.strip() for name, value in pairs}
