"""Input rules of a contact form: header-safe text, phone numbers, and attachments by what they hold."""

import array
import codecs
import os
import re
import struct
import zipfile
import zlib
from xml.parsers import expat

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
# Zip containers among them, opened and unpacked for real (bombs, macros).
ZIP_TYPES = {
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "application/vnd.oasis.opendocument.text",
}
# And any other zip an allow-list from settings may admit: OOXML and ODF families, plain zips.
ZIP_TYPE_PREFIXES = ("application/vnd.openxmlformats-officedocument.", "application/vnd.oasis.opendocument.")
ZIP_OTHER_TYPES = {"application/zip", "application/x-zip-compressed"}
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
# What must never reach a mail header, anywhere in a value: control characters (CR/LF would inject
# headers, NUL breaks storage) and the bidi embeddings, overrides and isolates (U+202A-U+202E,
# U+2066-U+2069), which make a subject or a name read other than it is.
_HEADER_UNSAFE_CHARS = r"\x00-\x1f\x7f\u202a-\u202e\u2066-\u2069"
# Nor RFC 2047 encoded-word syntax (=?charset?Q|B?text?=): mail clients decode it, to a line break
# and a Bcc header for instance. Matched as leniently as decoders read it (Python's own included).
_NO_ENCODED_WORD = r"(?![\s\S]*=\?[^?]*\?[BbQq]\?[\s\S]*\?=)"
_SPACES = r"\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
HEADER_FIELD_MESSAGE = (
    "Line breaks, control characters, text direction overrides and encoded words (=?...?=) "
    "are not allowed in this field."
)
# The header-field rule: every field that reaches a header (subject, full_name, job_profession;
# the email pattern below states it too), in the API, the contact page and the admin's form.
validate_header_safe = RegexValidator(
    rf"^{_NO_ENCODED_WORD}[^{_HEADER_UNSAFE_CHARS}]*$", HEADER_FIELD_MESSAGE, code="header_injection"
)
# The same rule, with at least one visible character (a value of spaces is trimmed to nothing).
validate_header_safe_required = RegexValidator(
    rf"^{_NO_ENCODED_WORD}[^{_HEADER_UNSAFE_CHARS}]*[^{_HEADER_UNSAFE_CHARS}{_SPACES}][^{_HEADER_UNSAFE_CHARS}]*$",
    HEADER_FIELD_MESSAGE,
    code="header_injection",
)
validate_no_nul = RegexValidator(r"^[^\x00]*$", "Null characters are not allowed.", code="null_characters")
# What Django's EmailValidator requires beyond the generic format: a dot-atom local part and a
# top-level domain of at least two letters, and (as RFC 5321 says) at most 64 characters before
# the @; and, as every header field, no encoded word (the address is the mail's Reply-To). Stated
# as a pattern so the API schema says it too.
validate_email_shape = RegexValidator(
    rf"^{_NO_ENCODED_WORD}"
    r"(?=[^@]{1,64}@)[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*@"
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


# --- office documents: zips read entry by entry, sizes counted as they unpack -------------------

# Bytes read or unpacked per step, so a bomb is stopped at the cap, never held in memory.
CHUNK = 64 * 1024
# The one part whose content is read, not just counted: what each part of an OOXML package is.
CONTENT_TYPES_PART = "[Content_Types].xml"
MAX_CONTENT_TYPES_BYTES = 1024 * 1024
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_STORED, _DEFLATED = zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED
DAMAGED = "The document is damaged and cannot be opened."


class ContentRefused(Exception):
    """A file refused for what it holds; `code` says which rule."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


# Macro-enabled Office files, as a package may embed them (word/embeddings/...).
MACRO_ENABLED_SUFFIXES = (".docm", ".dotm", ".xlsm", ".xltm", ".xlam", ".pptm", ".potm", ".ppsm", ".ppam")


def _is_macro_part(name):
    # vbaProject.bin holds the VBA of a .docm/.xlsm/.pptm wherever the package puts it; ODF keeps
    # StarBasic and script macros under Basic/ and Scripts/.
    lowered = name.lower()
    return (
        lowered.rsplit("/", 1)[-1] == "vbaproject.bin"
        or lowered.startswith(("basic/", "scripts/"))
        or lowered.endswith(MACRO_ENABLED_SUFFIXES)
    )


def _is_macro_content_type(content_type):
    lowered = content_type.lower()
    return "macroenabled" in lowered or "vbaproject" in lowered


def _content_types(data):
    """Return every ContentType that [Content_Types].xml names, read by a parser, not by eye."""
    found = []
    parser = expat.ParserCreate()

    def refuse_dtd(*args):
        # A package part never has a DTD; one could hide names behind entities.
        raise ContentRefused(DAMAGED, "damaged")

    parser.StartDoctypeDeclHandler = refuse_dtd
    parser.EntityDeclHandler = refuse_dtd
    parser.StartElementHandler = lambda tag, attrs: found.append(attrs.get("ContentType", ""))
    try:
        parser.Parse(data, True)
    except expat.ExpatError as error:
        raise ContentRefused(DAMAGED, "damaged") from error
    return found


def _entry_chunks(upload, info):
    """Yield the entry's unpacked bytes in chunks, read from its local header on, sizes unread.

    The stream is inflated until it ends, however small the sizes the headers declare.
    """
    upload.seek(info.header_offset)
    header = upload.read(_LOCAL_HEADER.size)
    if len(header) < _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        raise ContentRefused(DAMAGED, "damaged")
    name_length, extra_length = _LOCAL_HEADER.unpack(header)[-2:]
    upload.seek(info.header_offset + _LOCAL_HEADER.size + name_length + extra_length)
    if info.compress_type == _STORED:
        left = info.compress_size
        while left > 0:
            chunk = upload.read(min(CHUNK, left))
            if not chunk:
                raise ContentRefused(DAMAGED, "damaged")
            left -= len(chunk)
            yield chunk
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    while not inflater.eof:
        packed = inflater.unconsumed_tail or upload.read(CHUNK)
        if not packed:
            raise ContentRefused(DAMAGED, "damaged")
        try:
            chunk = inflater.decompress(packed, CHUNK)
        except zlib.error as error:
            raise ContentRefused(DAMAGED, "damaged") from error
        if chunk:
            yield chunk


def check_office_zip(upload):
    """Open an office document as the zip it is: count real unpacked bytes, refuse bombs and macros."""
    size = upload.size
    limit = min(MAX_UNPACKED_BYTES, size * MAX_UNPACKED_RATIO)
    upload.seek(0)
    try:
        entries = zipfile.ZipFile(upload).infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise ContentRefused(DAMAGED, "damaged") from error
    if len(entries) > MAX_ZIP_ENTRIES:
        raise ContentRefused("The document has too many parts.", "zip_bomb")
    unpacked = 0
    for info in entries:
        if _is_macro_part(info.filename):
            raise ContentRefused("The document contains macros.", "macro")
        # Encrypted entries cannot be checked; office packages never use other methods.
        if info.flag_bits & 0x1 or info.compress_type not in (_STORED, _DEFLATED):
            raise ContentRefused(DAMAGED, "damaged")
        keep = info.filename == CONTENT_TYPES_PART
        content, length, crc = [], 0, 0
        for chunk in _entry_chunks(upload, info):
            length += len(chunk)
            unpacked += len(chunk)
            if unpacked > limit:
                raise ContentRefused("The document unpacks to an unreasonable size.", "zip_bomb")
            crc = zlib.crc32(chunk, crc)
            if keep:
                if length > MAX_CONTENT_TYPES_BYTES:
                    raise ContentRefused(DAMAGED, "damaged")
                content.append(chunk)
        # A size or checksum other than declared: the zip lies, and readers may disagree on it.
        if length != info.file_size or crc != info.CRC:
            raise ContentRefused(DAMAGED, "damaged")
        if keep and any(_is_macro_content_type(kind) for kind in _content_types(b"".join(content))):
            raise ContentRefused("The document contains macros.", "macro")


# --- PDF: every name in the file and in its object streams ----------------------------------------

# Names whose presence anywhere means the PDF can run something or carries a file: JavaScript
# (as an action's type and in the document's names), launching a program, embedded files, Flash
# and other rich media. Always there beside the script, so found even inside stream data.
PDF_ACTIVE_NAMES = {b"JavaScript", b"Launch", b"EmbeddedFile", b"EmbeddedFiles", b"RichMedia"}
# The script key itself: two letters, which random bytes in image data hold now and then, so
# looked for only in the PDF's syntax (outside stream data) and in its object streams.
PDF_SCRIPT_KEY = b"JS"
PDF_ACTIVE = "The PDF contains script, a launch action or an embedded file."
# A name: a slash and the regular characters that follow; #xx escapes a byte (/J#61vaScript).
_PDF_NAME = re.compile(rb"/([^\x00\t\n\x0c\r ()<>\[\]{}/%]*)")
_PDF_ESCAPE = re.compile(rb"#([0-9A-Fa-f]{2})")
# The filters and parameters a stream's dictionary may name, abbreviations included (pdf.js takes
# them on any stream). An object stream is read only when plain or deflated, without a predictor:
# any other encoding could hide names from this check.
_PDF_FLATE = {b"FlateDecode", b"Fl"}
_PDF_DECODINGS = _PDF_FLATE | {
    b"ASCIIHexDecode",
    b"AHx",
    b"ASCII85Decode",
    b"A85",
    b"LZWDecode",
    b"LZW",
    b"RunLengthDecode",
    b"RL",
    b"Crypt",
    b"DecodeParms",
    b"DP",
    b"Predictor",
}
# What makes a stream an object stream to a reader: its type, or the two keys it is parsed by
# (a reader that finds it through a cross-reference stream may not look at the type).
_PDF_OBJECT_STREAM_KEYS = {b"N", b"First"}
# A stream's data runs from this keyword and its line end to the first `endstream`.
_PDF_STREAM_START = re.compile(rb"(?<![A-Za-z])stream(?:\r\n|\n|\r)")
_PDF_STREAM_END = b"endstream"
_PDF_OBJ = re.compile(rb"obj")
# How much of a PDF or OLE2 file is read at a time, so a 10 MB upload is never held whole.
SCAN_CHUNK = 1024 * 1024
# Bytes kept from one chunk for the next, so no token is cut where they meet: a name is at most
# 127 bytes (three times that with #xx escapes); `endstream` and `stream` with its line end are shorter.
_PDF_CARRY = 3 * 127 + 16
# The names this check acts on; any other name is skipped, so a longer one needs no carrying.
_PDF_WATCHED = PDF_ACTIVE_NAMES | {PDF_SCRIPT_KEY}
_PDF_DESCRIBING = _PDF_DECODINGS | _PDF_OBJECT_STREAM_KEYS | {b"ObjStm"}
_PDF_UNCHECKABLE = "The PDF is encoded in a way that cannot be checked."


def _pdf_names_between(data, start, cut, end, closed):
    """Yield (offset, name) for the watched names starting in data[start:cut], read up to `end`."""
    for match in _PDF_NAME.finditer(data, start, end):
        if match.start() >= cut:
            break
        # A name running into an open `end` began before `cut`, so is longer than any watched name.
        if match.end() == end and not closed:
            continue
        name = _PDF_ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), match.group(1))
        if name in _PDF_WATCHED or name in _PDF_DESCRIBING:
            yield match.start(), name


class _PdfNames:
    """The watched names in data given piece by piece, found even when split between pieces."""

    def __init__(self):
        self.found = False
        self.carry = b""

    def feed(self, piece, final=False):
        """Look for watched names in `piece`, keeping what may be the start of one for the next."""
        data = self.carry + piece
        cut = len(data) if final else max(len(data) - _PDF_CARRY, 0)
        for _, name in _pdf_names_between(data, 0, cut, len(data), final):
            self.found = self.found or name in _PDF_WATCHED
        self.carry = data[cut:]


class _PdfScan:
    """Read a PDF chunk by chunk: its syntax, each stream's data and each object stream unpacked."""

    def __init__(self, size):
        self.budget = min(MAX_UNPACKED_BYTES, max(size, 1) * MAX_UNPACKED_RATIO)
        self.buffer = b""
        self.lead = 0  # bytes at the buffer's start already read: kept for the keyword's look-behind
        self.in_stream = False
        self.active = False  # a watched name in the syntax: refused once the whole file is read
        self.described = set()  # names of the dictionary so far: what follows the last `obj`
        self.stream_script = False
        self.objects = None
        self.inflater = None
        self.unpacked = 0
        self.problem = None

    def feed(self, chunk, final=False):
        """Read the next chunk of the file (`final` when the file has ended)."""
        self.buffer += chunk
        while self._stream(final) if self.in_stream else self._syntax(final):
            pass

    def _syntax(self, final):
        data, start = self.buffer, self.lead
        match = _PDF_STREAM_START.search(data, start)
        if match and match.end() == len(data) and not final:
            # A CR at the end may be the start of a CRLF, which moves where the data starts.
            end = cut = match.start()
            match, closed = None, True
        elif match:
            end = cut = match.start()
            closed = True
        else:
            end, closed = len(data), final
            cut = end if final else max(end - _PDF_CARRY, start)
        names = list(_pdf_names_between(data, start, cut, end, closed))
        self.active = self.active or any(name in _PDF_WATCHED for _, name in names)
        last_obj = None
        for found in _PDF_OBJ.finditer(data, start, end):
            if found.start() >= cut:
                break
            last_obj = found.end()
        if last_obj is not None:
            self.described = set()
        self.described.update(
            name for at, name in names if name in _PDF_DESCRIBING and (last_obj is None or at >= last_obj)
        )
        if match:
            self._open_stream()
            self.buffer, self.lead = data[match.end() :], 0
            return True
        keep = max(cut - 1, 0)
        self.buffer, self.lead = data[keep:], cut - keep
        return False

    def _open_stream(self):
        described, self.described = self.described, set()
        self.in_stream, self.stream_script, self.problem = True, False, None
        self.objects, self.inflater, self.unpacked = None, None, 0
        if b"ObjStm" not in described and not _PDF_OBJECT_STREAM_KEYS <= described:
            return
        # An object stream holds dictionaries compressed: they are read like the file's own syntax.
        filters = described & _PDF_DECODINGS
        if filters - _PDF_FLATE:
            self.problem = (_PDF_UNCHECKABLE, "damaged")
            return
        self.objects = _PdfNames()
        self.inflater = zlib.decompressobj() if filters else None

    def _stream(self, final):
        data = self.buffer
        end = data.find(_PDF_STREAM_END)
        closed = end >= 0
        if closed:
            cut = end
        else:
            end = len(data)
            cut = end if final else max(end - _PDF_CARRY, 0)
        for _, name in _pdf_names_between(data, 0, cut, end, closed or final):
            if name in PDF_ACTIVE_NAMES:
                raise ContentRefused(PDF_ACTIVE, "active_content")
            self.stream_script = self.stream_script or name == PDF_SCRIPT_KEY
        if self.objects is not None:  # sliced only here: image data is never copied
            self._unpack(data[:cut])
        if closed:
            self._close_stream()
            self.buffer, self.lead = data[end + len(_PDF_STREAM_END) - 1 :], 1
            return True
        self.buffer = data[cut:]
        if final:
            # Never ended, so never a stream to a reader: its data is syntax, and nothing is unpacked.
            self.active = self.active or self.stream_script
        return False

    def _unpack(self, piece):
        if self.problem or not piece:
            return
        if self.inflater is None:
            self.unpacked += len(piece)
            self.objects.feed(piece)
            return
        try:
            while piece and not self.inflater.eof:
                out = self.inflater.decompress(piece, CHUNK)
                self.unpacked += len(out)
                if self.unpacked > self.budget:
                    self.problem = ("The PDF unpacks to an unreasonable size.", "zip_bomb")
                    return
                self.objects.feed(out)
                piece = self.inflater.unconsumed_tail
        except zlib.error:
            self.problem = (_PDF_UNCHECKABLE, "damaged")

    def _close_stream(self):
        self.in_stream = False
        # Only now is it sure the stream ends, so that what went wrong unpacking it counts.
        if self.problem:
            raise ContentRefused(*self.problem)
        if self.objects is not None:
            self.objects.feed(b"", final=True)
            self.active = self.active or self.objects.found
            self.budget -= self.unpacked
        self.objects = self.inflater = None


def check_pdf(upload):
    """Refuse a PDF that runs script, launches programs or carries files, reading all of it."""
    upload.seek(0, os.SEEK_END)
    scan = _PdfScan(upload.tell())
    upload.seek(0)
    for chunk in iter(lambda: upload.read(SCAN_CHUNK), b""):
        scan.feed(chunk)
    scan.feed(b"", final=True)
    if scan.active:
        raise ContentRefused(PDF_ACTIVE, "active_content")


# --- OLE2 documents (DOC, XLS): the directory read for a VBA project ----------------------------

OLE_TYPES = {"application/msword", "application/vnd.ms-excel", "application/vnd.ms-office"}
# Where a VBA project lives: Word's Macros storage, Excel's _VBA_PROJECT_CUR, and inside either
# the VBA storage with its _VBA_PROJECT stream. Names compare without case, as the format says.
OLE_MACRO_NAMES = {"macros", "_vba_project_cur", "vba", "_vba_project"}
_OLE_HEADER = struct.Struct("<8s16sHHHHH6sIIIIIIIII109I")
_OLE_LAST_SECTOR = 0xFFFFFFFA  # higher numbers mark free sectors and chain ends
_OLE_ENTRY = struct.Struct("<64sHB")


def _ole_sectors(upload, total, size, numbers):
    """Yield the sectors numbered `numbers`, each read on its own from the file."""
    for number in numbers:
        start = (number + 1) * size
        if number >= _OLE_LAST_SECTOR or start + size > total:
            raise ContentRefused(DAMAGED, "damaged")
        upload.seek(start)
        sector = upload.read(size)
        if len(sector) != size:
            raise ContentRefused(DAMAGED, "damaged")
        yield sector


def _ole_chain(fat, first):
    """Yield the sector numbers of a chain, refusing loops and numbers past the table."""
    seen, number = set(), first
    while number < _OLE_LAST_SECTOR:
        if number in seen or number >= len(fat):
            raise ContentRefused(DAMAGED, "damaged")
        seen.add(number)
        yield number
        number = fat[number]


def ole_entry_names(upload):
    """Return the names of every storage and stream in an OLE2 compound file's directory."""
    upload.seek(0, os.SEEK_END)
    total = upload.tell()
    upload.seek(0)
    head = upload.read(_OLE_HEADER.size)
    if len(head) < _OLE_HEADER.size:
        raise ContentRefused(DAMAGED, "damaged")
    header = _OLE_HEADER.unpack(head)
    shift, fat_count, directory_start, difat_start, difat_count = (
        header[5],
        header[9],
        header[10],
        header[15],
        header[16],
    )
    if shift not in (9, 12):
        raise ContentRefused(DAMAGED, "damaged")
    size = 1 << shift
    per_sector = size // 4
    fat_sectors = [number for number in header[17:] if number < _OLE_LAST_SECTOR]
    number = difat_start
    for _ in range(difat_count):
        [sector] = _ole_sectors(upload, total, size, [number])
        numbers = struct.unpack(f"<{per_sector}I", sector)
        fat_sectors += [n for n in numbers[:-1] if n < _OLE_LAST_SECTOR]
        number = numbers[-1]
    if len(fat_sectors) < fat_count:
        raise ContentRefused(DAMAGED, "damaged")
    # Four bytes a sector, not a Python int each: the table of a 10 MB file stays small.
    fat = array.array("I")
    for sector in _ole_sectors(upload, total, size, fat_sectors[:fat_count]):
        fat.extend(struct.unpack(f"<{per_sector}I", sector))
    names = []
    for sector in _ole_sectors(upload, total, size, _ole_chain(fat, directory_start)):
        for offset in range(0, size, 128):
            raw, length, kind = _OLE_ENTRY.unpack_from(sector, offset)
            if kind and 2 <= length <= 64:
                names.append(raw[: length - 2].decode("utf-16-le", "replace"))
    return names


def check_ole_document(upload):
    """Refuse a Word or Excel 97-2003 file that carries a VBA project."""
    names = ole_entry_names(upload)
    if any(name.lower() in OLE_MACRO_NAMES for name in names):
        raise ContentRefused("The document contains macros.", "macro")


# --- text: the whole file, in one encoding, with no binary ---------------------------------------

TEXT_TYPES = {"text/plain", "text/csv", "application/csv"}
# Control characters a text file has no use for (tab, line feed, form feed and CR are kept).
_BINARY_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
ACTIVE_MARKUP_TEXT = re.compile(ACTIVE_MARKUP.pattern.decode(), re.I)
# How the rest must decode, by libmagic's reading of the head: UTF-8 and UTF-16 strictly to the
# end. Other heads (ASCII, Latin-1, Windows-1252) are 8-bit text, where any byte but a control
# character is text: an ASCII head may well be followed by accented names further down.
_TEXT_CODECS = {"utf-8": "utf-8", "utf-16le": "utf-16-le", "utf-16be": "utf-16-be"}


def check_text(upload, encoding):
    """Read a text file to the end: one encoding throughout, no NUL or other binary, no markup."""
    decoder = codecs.getincrementaldecoder(_TEXT_CODECS.get(encoding, "latin-1"))(errors="strict")
    upload.seek(0)
    tail = ""
    try:
        for chunk in iter(lambda: upload.read(CHUNK), b""):
            text = decoder.decode(chunk)
            if _BINARY_CHARACTERS.search(text):
                raise ContentRefused("The text file contains binary data.", "binary")
            # A little of the previous chunk, so a tag split between two chunks is found too.
            if ACTIVE_MARKUP_TEXT.search(tail + text):
                raise ContentRefused("The file contains web page markup or script.", "active_content")
            tail = text[-32:]
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as error:
        raise ContentRefused(
            f"The text file is not valid {encoding.upper()} throughout.", "encoding"
        ) from error


def is_zip_type(content_type):
    """Return whether files of this type are zip containers, checked entry by entry."""
    return (
        content_type in ZIP_TYPES
        or content_type in ZIP_OTHER_TYPES
        or content_type.startswith(ZIP_TYPE_PREFIXES)
        or "macroenabled" in content_type.lower()
    )


def _check_content(upload, content_type):
    if is_zip_type(content_type):
        check_office_zip(upload)
    elif content_type == "application/pdf":
        check_pdf(upload)
    elif content_type in OLE_TYPES:
        check_ole_document(upload)
    elif content_type in TEXT_TYPES:
        check_text(upload, _text_encoding(upload))


def _text_encoding(upload):
    upload.seek(0)
    head = upload.read(SNIFF_BYTES)
    upload.seek(0)
    return magic.Magic(mime_encoding=True).from_buffer(head)


def validate_attachment(upload):
    """Check an uploaded file's size, type, extension and what it holds; return its sniffed MIME type."""
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
    try:
        _check_content(upload, content_type)
    except ContentRefused as refused:
        _refuse(str(refused), refused.code)
    finally:
        upload.seek(0)
    return content_type
