"""Where attachments live: private storage paths that cannot traverse, collide or overflow."""

import os
import unicodedata
import uuid

from django.utils import timezone

MAX_NAME_BYTES = 255
# The storage folder every attachment is written under, and that the orphan purge walks.
ATTACHMENT_FOLDER = "email_attachments"


def attachment_upload_to(instance, filename):
    """Store under the day's folder with a random name; keep only a known-safe extension."""
    ext = os.path.splitext(filename)[1].lower()
    if not (ext[1:].isascii() and ext[1:].isalnum()) or len(ext) > 10:
        ext = ""
    return f"{ATTACHMENT_FOLDER}/{timezone.now():%Y/%m/%d}/{uuid.uuid4().hex}{ext}"


def clean_filename(name):
    """Return the original name without path parts or control characters, at most 255 bytes."""
    # NFC first: a name typed on macOS arrives decomposed, longer in bytes than it looks.
    name = unicodedata.normalize("NFC", name).replace("\\", "/").rsplit("/", 1)[-1]
    # Control and format characters (NUL, CR/LF, right-to-left overrides) and the Unicode line and
    # paragraph separators never reach disk or mail.
    name = "".join(ch for ch in name if not _is_unsafe_char(ch)).strip().strip(".")
    stem, ext = os.path.splitext(name)
    while len((stem + ext).encode("utf-8")) > MAX_NAME_BYTES and stem:
        stem = stem[:-1]
    name = (stem.rstrip() + ext) or "attachment"
    # An extension alone can still be too long; cut it on a character boundary.
    return name.encode("utf-8")[:MAX_NAME_BYTES].decode("utf-8", "ignore")


def _is_unsafe_char(ch):
    category = unicodedata.category(ch)
    return category[0] == "C" or category in ("Zl", "Zp")
