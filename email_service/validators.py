"""Input rules of a contact form: header-safe text, phone numbers, and attachments by content."""

import os
import re
import zipfile

import magic
from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from django.template.defaultfilters import filesizeformat

from . import conf
from .storage import clean_filename

# Sniffed MIME type -> the extensions a file of that type may carry.
DEFAULT_ALLOWED_ATTACHMENT_TYPES = {
    "application/pdf": [".pdf"],
    "image/png": [".png"],
    "image/jpeg": [".jpg", ".jpeg"],
    "image/gif": [".gif"],
    "image/webp": [".webp"],
    "image/heic": [".heic"],
    "image/heif": [".heif", ".heic"],
    "text/plain": [".txt", ".csv"],
    "text/csv": [".csv", ".txt"],
    "application/csv": [".csv"],
    "text/rtf": [".rtf"],
    "application/rtf": [".rtf"],
    "application/msword": [".doc"],
    "application/vnd.ms-excel": [".xls"],
    "application/vnd.ms-office": [".doc", ".xls"],
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": [".docx"],
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": [".xlsx"],
    "application/vnd.oasis.opendocument.text": [".odt"],
}
# The default allow-list's types, for the OpenAPI schema's list of attachment media types.
ALLOWED_CONTENT_TYPES = tuple(DEFAULT_ALLOWED_ATTACHMENT_TYPES)
# Zip containers among them, whose unpacked size is checked against bombs.
ZIP_TYPES = {
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "application/vnd.oasis.opendocument.text",
}
# libmagic needs the first entries of an OOXML zip to tell DOCX from a plain zip.
SNIFF_BYTES = 64 * 1024
# What libmagic reports for an OLE2 file (DOC, XLS) whose directory lies past the leading bytes.
OLE_CONTAINER_TYPES = {"application/x-ole-storage", "application/CDFV2"}
MAX_UNPACKED_RATIO = 100
MAX_UNPACKED_BYTES = 200 * 1024 * 1024
MAX_ZIP_ENTRIES = 10_000
# Markup a browser would run if it ever rendered the file as a page.
ACTIVE_MARKUP = re.compile(rb"<\s*(html|script|svg|iframe|object|embed|body|!doctype\s+html)\b", re.I)


def allowed_attachment_types():
    """Return the allow-list: sniffed MIME type -> the extensions a file of that type may carry."""
    configured = conf.allowed_attachment_types()
    return DEFAULT_ALLOWED_ATTACHMENT_TYPES if configured is None else configured


def allowed_content_types():
    """Return the MIME types the allow-list in force accepts, in its order."""
    return tuple(allowed_attachment_types())


def allowed_extensions():
    """Return every extension the allow-list accepts, sorted."""
    return sorted({ext for exts in allowed_attachment_types().values() for ext in exts})


# Regex validators, so that the OpenAPI schema carries the same rules as patterns.
# Header fields: no control characters at all (CR/LF would inject headers, NUL breaks storage).
validate_header_safe = RegexValidator(
    r"^[^\x00-\x1f\x7f]*$",
    "Line breaks and control characters are not allowed in this field.",
    code="header_injection",
)
# The same, with at least one visible character (a value of spaces is trimmed to nothing).
validate_header_safe_required = RegexValidator(
    r"^[^\x00-\x1f\x7f]*[^\x00-\x20\x7f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000][^\x00-\x1f\x7f]*$",
    "Enter a value without line breaks or control characters.",
    code="header_injection",
)
validate_no_nul = RegexValidator(r"^[^\x00]*$", "Null characters are not allowed.", code="null_characters")
# What Django's EmailValidator requires beyond the generic format: a dot-atom local part and a
# top-level domain of at least two letters, and (as RFC 5321 says) at most 64 characters before
# the @. Stated as a pattern so the API schema says it too.
validate_email_shape = RegexValidator(
    r"^(?=[^@]{1,64}@)[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*@"
    r"([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$",
    "Enter a valid email address.",
    code="invalid",
)
# Digits and + - ( ) . and spaces, with at least one digit; or nothing.
validate_phone = RegexValidator(
    r"^([+\-(). ]*[0-9][0-9+\-(). ]*)?$",
    "Enter a phone number using digits and + - ( ) . and spaces only.",
    code="invalid_phone",
)


def _refuse(message, code):
    raise ValidationError(
        f"{message} Allowed: {', '.join(allowed_extensions())}, "
        f"up to {filesizeformat(conf.attachment_max_bytes())}.",
        code=code,
    )


def sniff_content_type(upload):
    """Return the MIME type libmagic finds in the file, and the file's leading bytes."""
    upload.seek(0)
    head = upload.read(SNIFF_BYTES)
    upload.seek(0)
    content_type = magic.from_buffer(head, mime=True)
    if content_type in OLE_CONTAINER_TYPES and upload.size > len(head):
        content_type = _sniff_whole(upload)
    return content_type, head


def _sniff_whole(upload):
    # Large uploads are already on disk: libmagic reads the file itself, not through our memory.
    if hasattr(upload, "temporary_file_path"):
        return magic.from_file(upload.temporary_file_path(), mime=True)
    upload.seek(0)
    try:
        return magic.from_buffer(upload.read(), mime=True)
    finally:
        upload.seek(0)


def _unpacked_size(upload):
    """Return the total size the zip's entries declare, or None if it is not a sane zip."""
    upload.seek(0)
    try:
        with zipfile.ZipFile(upload) as archive:
            entries = archive.infolist()
            if len(entries) > MAX_ZIP_ENTRIES:
                return None
            return sum(info.file_size for info in entries)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return None
    finally:
        upload.seek(0)


def validate_attachment(upload):
    """Check an uploaded file's size, content type and extension; return its sniffed MIME type."""
    size = upload.size
    if not size:
        _refuse("The file is empty.", "empty")
    if size > conf.attachment_max_bytes():
        _refuse(f"The file is {filesizeformat(size)}, which is too large.", "too_large")
    content_type, head = sniff_content_type(upload)
    allowed = allowed_attachment_types()
    if content_type not in allowed:
        _refuse(f"The file's content is {content_type}, which is not accepted.", "type")
    # The extension of the name that will be stored and mailed, not of the raw one.
    ext = os.path.splitext(clean_filename(upload.name or ""))[1].lower()
    if ext not in allowed[content_type]:
        _refuse(
            f"The file's name ends in '{ext or 'nothing'}' but its content is {content_type}.",
            "extension",
        )
    if ACTIVE_MARKUP.search(head):
        _refuse("The file contains web page markup or script.", "active_content")
    if content_type in ZIP_TYPES:
        unpacked = _unpacked_size(upload)
        if unpacked is None:
            _refuse("The document is damaged and cannot be opened.", "damaged")
        if unpacked > MAX_UNPACKED_BYTES or unpacked > size * MAX_UNPACKED_RATIO:
            _refuse("The document unpacks to an unreasonable size.", "zip_bomb")
    return content_type
