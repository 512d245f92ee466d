"""A local SMTP server that keeps every mail it receives as an .eml file."""

import logging
import os
import uuid
from email import message_from_bytes
from email.policy import default as default_policy
from pathlib import Path

from django.utils import timezone

logger = logging.getLogger(__name__)


class MailboxHandler:
    """aiosmtpd handler: write each message to `directory` and log one line about it."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    async def handle_DATA(self, server, session, envelope):
        name = f"{timezone.now():%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}.eml"
        temporary = self.directory / f".{name}.tmp"
        temporary.write_bytes(envelope.original_content or envelope.content)
        # Renamed only once complete, so a reader never sees half a mail.
        os.replace(temporary, self.directory / name)
        headers = message_from_bytes(envelope.original_content or b"", policy=default_policy)
        # No addresses: an acknowledgement's recipient is the person who wrote in.
        logger.info(
            "Mail for %d recipient(s), %d bytes, request %s, %s mail, saved as %s",
            len(envelope.rcpt_tos),
            len(envelope.original_content or b""),
            headers.get("X-Email-Request-ID", "-"),
            _kind(headers),
            name,
        )
        return "250 Message accepted for delivery"


def _kind(headers):
    """Name the service's mail: a staff reply, an acknowledgement, or the mail to support."""
    if headers.get("X-Email-Reply-ID"):
        return "reply"
    return "acknowledgement" if headers.get("Auto-Submitted") else "support"
