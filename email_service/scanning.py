"""Virus scanning of uploads by ClamAV's clamd, streamed over its INSTREAM command.

The client is clamav-client (artefactual-labs), the maintained successor of the `clamd` package.
"""

import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

from clamav_client.clamd import BufferTooLongError, ClamdError, ClamdNetworkSocket, ClamdUnixSocket
from rest_framework import serializers
from rest_framework.exceptions import APIException

from . import conf

logger = logging.getLogger(__name__)

CLEAN, INFECTED, UNAVAILABLE = "clean", "infected", "unavailable"


@dataclass(frozen=True)
class ScanResult:
    """What clamd said about one file: clean, infected (with the signature's name) or unavailable."""

    status: str
    signature: str = ""

    @property
    def is_clean(self):
        return self.status == CLEAN

    @property
    def is_infected(self):
        return self.status == INFECTED


class ScannerUnavailable(APIException):
    """The scanner could not be reached and EMAIL_CLAMAV_REQUIRED refuses unscanned files."""

    status_code = 503
    default_detail = "Attachments cannot be checked for viruses right now; try again later."
    default_code = "scanner_unavailable"


def scanner(url, timeout):
    """Return a clamd client for `unix:///path` or `tcp://host:port`."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return ClamdUnixSocket(path=parts.path, timeout=timeout)
    if parts.scheme == "tcp" and parts.hostname and parts.port:
        return ClamdNetworkSocket(host=parts.hostname, port=parts.port, timeout=timeout)
    raise ValueError("EMAIL_CLAMAV_URL must be unix:///path or tcp://host:port")


def scan(fileobj, url=None):
    """Stream `fileobj` from its start to clamd and return what it found; rewind it afterwards."""
    client = scanner(url or conf.clamav_url(), conf.clamav_timeout())
    fileobj.seek(0)
    try:
        answer = client.instream(fileobj)
    except BufferTooLongError:
        # Larger than clamd's StreamMaxLength: it was not scanned, whatever clamd says next.
        logger.warning("clamd refused a stream over its StreamMaxLength")
        return ScanResult(UNAVAILABLE, "too large to scan")
    except (ClamdError, OSError) as error:
        logger.warning("clamd unavailable: %s", type(error).__name__)
        return ScanResult(UNAVAILABLE)
    finally:
        fileobj.seek(0)
    status, signature = answer.get("stream", ("ERROR", "no answer"))
    if status == "OK":
        return ScanResult(CLEAN)
    if status == "FOUND":
        logger.warning("clamd found %s in an upload", signature)
        return ScanResult(INFECTED, signature)
    logger.warning("clamd could not scan an upload: %s", signature)
    return ScanResult(UNAVAILABLE, signature or "")


def check_upload(upload):
    """Scan an upload for the serializer: raise for a virus, or for no scanner when one is required.

    Returns None when scanning is off (no EMAIL_CLAMAV_URL), else the ScanResult, so that an
    upload accepted without a scan can be marked as such.
    """
    if not conf.clamav_url():
        return None
    result = scan(upload)
    if result.is_infected:
        raise serializers.ValidationError("The file contains a virus and was refused.", code="infected")
    if result.status == UNAVAILABLE and conf.clamav_required():
        raise ScannerUnavailable()
    return result
