"""Real files of each accepted type, made by the tests, and hostile ones."""

import io
import random
import struct
import zipfile
import zlib


def pdf_bytes(text="MedCor referral letter", padding=0):
    """A complete PDF with one page of text, and an unused stream of `padding` bytes to make it big."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    if padding:
        filler = (b"0123456789abcdef" * (padding // 16 + 1))[:padding]
        objects.append(b"<< /Length %d >>\nstream\n" % padding + filler + b"\nendstream")
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref))
    return out.getvalue()


def png_bytes(width=4, height=4):
    """A valid RGB PNG image."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + b"\x80\x20\x20" * width for _ in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def pdf_of_size(size):
    """A valid PDF of exactly `size` bytes."""
    padding = max(size - len(pdf_bytes()) - 40, 1)
    for _ in range(3):  # the digits of the lengths and offsets shift the total a little
        padding += size - len(pdf_bytes(padding=padding))
    data = pdf_bytes(padding=padding)
    assert len(data) == size
    return data


def _pillow_image(fmt, **options):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 48), (240, 240, 250))
    ImageDraw.Draw(image).rectangle((8, 8, 40, 30), fill=(180, 20, 40))
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def jpeg_bytes():
    """A JPEG photo, as a phone camera or scanner would send."""
    return _pillow_image("JPEG", quality=90)


def gif_bytes():
    return _pillow_image("GIF")


def webp_bytes():
    return _pillow_image("WEBP")


def docx_bytes(text="Referral: ECG requested for chest pain on exertion."):
    """A Word document written by python-docx."""
    import docx

    document = docx.Document()
    document.add_heading("Referral letter", level=1)
    document.add_paragraph(text)
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def xlsx_bytes(rows=20):
    """An Excel workbook of lab results written by openpyxl."""
    import openpyxl

    workbook = openpyxl.Workbook()
    sheet = workbook.active
    sheet.append(["date", "test", "value", "unit"])
    for row in range(rows):
        sheet.append([f"2024-01-{row % 28 + 1:02d}", "Haemoglobin", 12.5 + row % 7 / 10, "g/dL"])
    out = io.BytesIO()
    workbook.save(out)
    return out.getvalue()


def odt_bytes(text="Referral letter written in LibreOffice."):
    """An OpenDocument text written by odfpy."""
    from odf.opendocument import OpenDocumentText
    from odf.text import P

    document = OpenDocumentText()
    document.text.addElement(P(text=text))
    out = io.BytesIO()
    document.write(out)
    return out.getvalue()


def xls_bytes(rows=20):
    """An Excel 97-2003 workbook written by xlwt; a few thousand rows put it past 64 KiB."""
    import xlwt

    workbook = xlwt.Workbook()
    sheet = workbook.add_sheet("Results")
    for row in range(rows):
        sheet.write(row, 0, f"2024-01-{row % 28 + 1:02d}")
        sheet.write(row, 1, "Haemoglobin")
        sheet.write(row, 2, 12.5 + row % 7 / 10)
    out = io.BytesIO()
    workbook.save(out)
    return out.getvalue()


# The start of a WordDocument stream, its File Information Block: wIdent 0xA5EC, nFib 0x00C1
# (Word 97), the rest of the block left zero; the text follows.
WORD_FIB = struct.pack("<HH", 0xA5EC, 0x00C1) + b"\x00" * 508


def doc_bytes(text="Referral letter saved by Word 97-2003."):
    """A Word 97-2003 file: an OLE2 compound file whose WordDocument stream starts with a FIB.

    Only the container and the stream's header are real; no library writes .doc files.
    """
    stream = WORD_FIB + text.encode("cp1252")
    return compound_file_bytes("WordDocument", stream)


def compound_file_bytes(stream_name, payload):
    """An OLE2 compound file (version 3, 512-byte sectors) holding one stream."""
    return compound_file_tree([(stream_name, payload)])


def compound_file_tree(tree):
    """An OLE2 compound file holding `tree`: (name, payload) for a stream, (name, [children]) for
    a storage; each storage's children are chained as right siblings."""
    sector = 512
    end_of_chain, fat_sector, free, no_stream = 0xFFFFFFFE, 0xFFFFFFFD, 0xFFFFFFFF, 0xFFFFFFFF
    rows, bodies = [], []  # rows: [name, kind, child, right, start, size]

    def add(name, content):
        index = len(rows)
        rows.append([name, 1 if isinstance(content, list) else 2, no_stream, no_stream, 0, 0])
        if isinstance(content, list):
            children = [add(*child) for child in content]
            _chain_siblings(rows, index, children)
        else:
            # At least 4096 bytes, so that the stream lives in the main FAT, not the mini stream.
            body = content.ljust(max(4096, -(-len(content) // sector) * sector), b"\x00")
            rows[index][4] = sum(len(b) for b in bodies) // sector
            rows[index][5] = len(content)
            bodies.append(body)
        return index

    rows.append(["Root Entry", 5, no_stream, no_stream, end_of_chain, 0])
    _chain_siblings(rows, 0, [add(*child) for child in tree])
    fat = []
    for body in bodies:
        first, count = len(fat), len(body) // sector
        fat += [first + index + 1 for index in range(count - 1)] + [end_of_chain]
    count = len(fat)
    # The FAT sector, then the directory's sectors (four entries each), chained.
    directory_sectors = -(-len(rows) // 4)
    fat += [fat_sector] + [count + 2 + index for index in range(directory_sectors - 1)] + [end_of_chain]
    assert len(fat) <= 128, "one FAT sector is enough for the files the tests make"
    fat += [free] * (128 - len(fat))

    directory = b"".join(_ole_entry(*row) for row in rows) + _ole_entry("", 0, no_stream, no_stream, 0, 0) * (
        4 * directory_sectors - len(rows)
    )
    header = _ole_header(fat_sectors=[count], directory_start=count + 1)
    return header + b"".join(bodies) + struct.pack("<128I", *fat) + directory


_OLE_END_OF_CHAIN, _OLE_FREE = 0xFFFFFFFE, 0xFFFFFFFF


def _ole_entry(name, kind, child, right, start, size):
    """One 128-byte directory entry of an OLE2 compound file (left sibling always none)."""
    encoded = (name + "\x00").encode("utf-16-le") if name else b""
    return struct.pack(
        "<64sHBBIII16sIQQIII",
        encoded,
        len(encoded),
        kind,
        1,
        _OLE_FREE,
        right,
        child,
        b"\x00" * 16,
        0,
        0,
        0,
        start,
        size,
        0,
    )


def _ole_header(*, fat_sectors, directory_start, difat_start=_OLE_END_OF_CHAIN, difat_count=0):
    """The 512-byte header of a version 3 compound file: its FAT's sectors (the first 109 listed
    here, the rest in DIFAT sectors), where the directory starts, and the DIFAT chain."""
    listed = fat_sectors[:109]
    return struct.pack(
        "<8s16sHHHHH6sIIIIIIIII",
        b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1",
        b"\x00" * 16,
        0x3E,
        3,
        0xFFFE,
        9,
        6,
        b"\x00" * 6,
        0,
        len(fat_sectors),
        directory_start,
        0,
        4096,
        _OLE_END_OF_CHAIN,
        0,
        difat_start,
        difat_count,
    ) + struct.pack("<109I", *listed, *[_OLE_FREE] * (109 - len(listed)))


def _chain_siblings(rows, parent, children):
    if children:
        rows[parent][2] = children[0]
        for left, right in zip(children, children[1:], strict=False):
            rows[left][3] = right


def doc_with_macros_bytes():
    """A Word 97-2003 file with a VBA project: the Macros storage, its VBA storage and _VBA_PROJECT."""
    word = WORD_FIB + b"Enable content to see this letter."
    return compound_file_tree(
        [("WordDocument", word), ("Macros", [("VBA", [("_VBA_PROJECT", b"\xcc\x61" + b"\x00" * 5)])])]
    )


def rtf_bytes(text="Referral letter"):
    return b"{\\rtf1\\ansi\\deff0 {\\fonttbl {\\f0 Times New Roman;}}\\f0\\fs24 " + text.encode() + b"\\par }"


def csv_bytes(rows=10):
    lines = ["date,test,value,unit"]
    lines += [f"2024-01-{row + 1:02d},Haemoglobin,{12.5 + row / 10},g/dL" for row in range(rows)]
    return ("\n".join(lines) + "\n").encode()


def text_bytes():
    return "Résultats du laboratoire: normaux.\nMerci de transmettre au Dr Müller.\n".encode()


# --- hostile files ----------------------------------------------------------------------------


def exe_bytes():
    """A Windows PE executable header: what a renamed installer starts with."""
    dos = b"MZ" + b"\x90\x00" + b"\x00" * 56
    dos = dos[:60] + struct.pack("<I", 64)
    pe = b"PE\x00\x00" + struct.pack("<HHIIIHH", 0x8664, 1, 0, 0, 0, 240, 0x22)
    return dos + pe + b"\x00" * 400


def html_bytes():
    return b"<!DOCTYPE html>\n<html><body><p>Invoice</p><script>fetch('/api/')</script></body></html>\n"


def svg_with_script_bytes():
    return (
        b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
        b'<script>alert(document.domain)</script><rect width="10" height="10"/></svg>\n'
    )


def pdf_html_polyglot_bytes():
    """A file that is a PDF to a PDF reader and a page with a script to a sniffing browser."""
    pdf = pdf_bytes()
    return pdf[:9] + b"<html><body><script>alert(document.cookie)</script></body></html>\n" + pdf[9:]


def zip_bytes():
    """A plain zip archive, no office document inside."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("readme.txt", "Not a document.")
        archive.writestr("setup.exe", exe_bytes())
    return out.getvalue()


def zip_bomb_docx_bytes(unpacked=64 * 1024 * 1024):
    """A zip that libmagic takes for a DOCX, whose document.xml unpacks to `unpacked` bytes of zeros."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        real = zipfile.ZipFile(io.BytesIO(docx_bytes()))
        for info in real.infolist():
            if info.filename != "word/document.xml":
                archive.writestr(info.filename, real.read(info.filename))
            else:
                with archive.open("word/document.xml", "w", force_zip64=True) as member:
                    chunk = b"\x00" * (1024 * 1024)
                    for _ in range(unpacked // len(chunk)):
                        member.write(chunk)
    return out.getvalue()


def _rezip(data, replace=None, add=()):
    """Copy a zip, with some entries' content replaced and entries added, as an office suite writes it."""
    replace = replace or {}
    out = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(data)) as source,
        zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive,
    ):
        for info in source.infolist():
            content = source.read(info.filename)
            # Each entry as it was: an ODF's mimetype stays stored, which is how it is recognised.
            archive.writestr(info, replace.get(info.filename, lambda c: c)(content))
        for name, content in add:
            archive.writestr(name, content)
    return out.getvalue()


MACRO_DOCUMENT_TYPE = b"application/vnd.ms-word.document.macroEnabled.main+xml"
DOCX_DOCUMENT_TYPE = b"application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"


def docm_as_docx_bytes():
    """A macro-enabled Word document (what Word saves as .docm), sent as a .docx."""
    return _rezip(
        docx_bytes(),
        replace={
            "[Content_Types].xml": lambda xml: xml.replace(DOCX_DOCUMENT_TYPE, MACRO_DOCUMENT_TYPE).replace(
                b"</Types>",
                b'<Default Extension="bin" ContentType="application/vnd.ms-office.vbaProject"/></Types>',
            )
        },
        add=[("word/vbaProject.bin", compound_file_bytes("VBA", b'Attribute VB_Name = "AutoOpen"'))],
    )


def docx_with_hidden_vba_bytes():
    """A DOCX whose content types are clean but which carries a vbaProject.bin in another folder."""
    return _rezip(docx_bytes(), add=[("customXml/vbaProject.bin", compound_file_bytes("VBA", b"Sub X()"))])


def docx_with_macro_content_type_bytes():
    """A DOCX whose main part is declared macro-enabled (an XLSM's type, with an entity-free char ref)."""
    return _rezip(
        docx_bytes(),
        replace={
            "[Content_Types].xml": lambda xml: xml.replace(
                DOCX_DOCUMENT_TYPE, b"application/vnd.ms-excel.sheet.&#109;acroEnabled.main+xml"
            )
        },
    )


def odt_with_basic_macro_bytes():
    """An OpenDocument text with a StarBasic module, as LibreOffice stores one."""
    module = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n<script:module xmlns:script="http://openoffice.org/2000/script"'
        b' script:name="Module1" script:language="StarBasic">Sub Main\nShell("calc")\nEnd Sub</script:module>'
    )
    return _rezip(odt_bytes(), add=[("Basic/Standard/Module1.xml", module)])


def _patch_entry_sizes(data, name, *, method=None, crc=None, compressed=None, uncompressed=None):
    """Rewrite what the local header and the central directory declare about one entry."""
    out = bytearray(data)
    encoded = name.encode()
    # (signature, offset of method/crc/sizes after it, offset of the name length)
    for signature, fields_at, name_at, name_start in (
        (b"PK\x03\x04", 8, 26, 30),
        (b"PK\x01\x02", 10, 28, 46),
    ):
        start = out.find(signature)
        while start != -1:
            (length,) = struct.unpack_from("<H", out, start + name_at)
            if out[start + name_start : start + name_start + length] == encoded:
                old = struct.unpack_from("<H", out, start + fields_at)[0]
                old_crc, old_compressed, old_uncompressed = struct.unpack_from(
                    "<III", out, start + fields_at + 6
                )
                struct.pack_into("<H", out, start + fields_at, old if method is None else method)
                struct.pack_into(
                    "<III",
                    out,
                    start + fields_at + 6,
                    old_crc if crc is None else crc,
                    old_compressed if compressed is None else compressed,
                    old_uncompressed if uncompressed is None else uncompressed,
                )
            start = out.find(signature, start + 4)
    return bytes(out)


def lying_size_docx_bytes(unpacked=1024**3, declared=1000):
    """A DOCX whose document.xml unpacks to 1 GiB of zeros while its headers declare 1,000 bytes.

    The entry is written stored, holding a ready deflate stream (each 1 MiB block compressed after
    a full flush is the same bytes, so no gigabyte is ever compressed), then the local header and
    the central directory are patched to say deflated, the real CRC and the lying size.
    """
    block = b"\x00" * (1024 * 1024)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    repeated = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    stream = repeated * (unpacked // len(block)) + zlib.compressobj(9, zlib.DEFLATED, -15).flush()
    crc = 0
    for _ in range(unpacked // len(block)):
        crc = zlib.crc32(block, crc)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(docx_bytes())) as source, zipfile.ZipFile(out, "w") as archive:
        for info in source.infolist():
            if info.filename == "word/document.xml":
                archive.writestr(zipfile.ZipInfo("word/document.xml"), stream, zipfile.ZIP_STORED)
            else:
                archive.writestr(info.filename, source.read(info.filename), zipfile.ZIP_DEFLATED)
    return _patch_entry_sizes(
        out.getvalue(), "word/document.xml", method=zipfile.ZIP_DEFLATED, crc=crc, uncompressed=declared
    )


def docx_with_wrong_size_bytes():
    """A DOCX whose styles.xml declares 10 bytes more than it holds: small, but lying."""
    data = docx_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        size = archive.getinfo("word/styles.xml").file_size
    return _patch_entry_sizes(data, "word/styles.xml", uncompressed=size + 10)


# --- PDFs that act --------------------------------------------------------------------------


def pdf_document(
    catalog=b"", objects=(), object_stream=(), object_stream_type=b"/Type /ObjStm /Filter /FlateDecode"
):
    """A one-page PDF: `catalog` added to the catalog, `objects` numbered from 6 on in the body,
    then `object_stream` objects compressed in an object stream with a cross-reference stream
    (as PDF 1.5 writers do); `object_stream_type` is what that stream's dictionary says of it."""
    page = b"BT /F1 12 Tf 72 720 Td (MedCor referral letter) Tj ET"
    body = [
        b"<< /Type /Catalog /Pages 2 0 R " + catalog + b" >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(page) + page + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        *objects,
    ]
    out = io.BytesIO()
    out.write(b"%PDF-1.5\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, content in enumerate(body, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + content + b"\nendobj\n")
    if not object_stream:
        xref = out.tell()
        out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(body) + 1))
        for offset in offsets:
            out.write(b"%010d 00000 n \n" % offset)
        out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(body) + 1, xref))
        return out.getvalue()
    first = len(body) + 1  # compressed objects are numbered after the body; then the streams
    index, packed = [], b""
    for position, content in enumerate(object_stream):
        index.append(b"%d %d" % (first + position, len(packed)))
        packed += content + b"\n"
    header = b" ".join(index) + b"\n"
    compressed = zlib.compress(header + packed)
    stream_number = first + len(object_stream)
    offsets.append(out.tell())
    out.write(
        b"%d 0 obj\n<< %s /N %d /First %d /Length %d >>\nstream\n"
        % (stream_number, object_stream_type, len(object_stream), len(header), len(compressed))
        + compressed
        + b"\nendstream\nendobj\n"
    )
    xref_number = stream_number + 1
    rows = [struct.pack(">BIH", 0, 0, 65535)]
    rows += [struct.pack(">BIH", 1, offset, 0) for offset in offsets[: len(body)]]
    rows += [struct.pack(">BIH", 2, stream_number, position) for position in range(len(object_stream))]
    rows += [struct.pack(">BIH", 1, offsets[-1], 0)]
    xref = out.tell()
    rows.append(struct.pack(">BIH", 1, xref, 0))
    table = zlib.compress(b"".join(rows))
    out.write(
        b"%d 0 obj\n<< /Type /XRef /Size %d /W [1 4 2] /Root 1 0 R /Filter /FlateDecode /Length %d >>\nstream\n"
        % (xref_number, xref_number + 1, len(table))
        + table
        + b"\nendstream\nendobj\nstartxref\n%d\n%%%%EOF\n" % xref
    )
    return out.getvalue()


def pdf_open_action_js_bytes():
    """A PDF that runs JavaScript as it opens."""
    return pdf_document(b"/OpenAction << /S /JavaScript /JS (app.alert('opened')) >>")


def pdf_launch_bytes():
    """A PDF whose open action launches a program."""
    return pdf_document(b"/OpenAction 6 0 R", [b"<< /S /Launch /F (cmd.exe) /Win << /F (cmd.exe) >> >>"])


def pdf_embedded_file_bytes():
    """A PDF carrying a file in its names tree."""
    payload = exe_bytes()
    return pdf_document(
        b"/Names << /EmbeddedFiles << /Names [(setup.exe) 6 0 R] >> >>",
        [
            b"<< /Type /Filespec /F (setup.exe) /EF << /F 7 0 R >> >>",
            b"<< /Type /EmbeddedFile /Length %d >>\nstream\n" % len(payload) + payload + b"\nendstream",
        ],
    )


def pdf_escaped_script_in_object_stream_bytes():
    """A PDF whose script action sits compressed in an object stream, its names #-escaped."""
    return pdf_document(
        b"/OpenAction 6 0 R", object_stream=[b"<< /S /J#61va#53cript /J#53 (app.alert(1)) >>"]
    )


def pdf_script_key_only_bytes():
    """An open action with a /JS key and no /S, in the file's own syntax."""
    return pdf_document(b"/OpenAction << /JS 6 0 R >>", [b"(app.alert(1))"])


def pdf_incremental_update_with_script_bytes():
    """A clean PDF followed by an incremental update, far past its first bytes, that adds a script."""
    clean = pdf_of_size(200_000)
    return (
        clean
        + b"1 0 obj\n<< /Type /Catalog /Pages 2 0 R /AA << /O << /S /JavaScript /JS (x) >> >> >>\nendobj\n"
    )


def pdf_with_words_like_names_bytes():
    """A clean PDF with object streams and an open action, whose strings mention JavaScript."""
    return pdf_document(
        b"/OpenAction [3 0 R /Fit]",
        object_stream=[b"<< /Title (Notes on JavaScript) /Author (Dr Launch) >>"],
    )


# --- text past the first 64 KiB -------------------------------------------------------------

# Past the bytes libmagic sniffs, so only a check that reads the whole file sees what follows.
PAST_THE_HEAD = 70 * 1024


def long_text_bytes():
    """A long UTF-8 lab report, accented throughout."""
    line = "Hämoglobin 12.5 g/dL – Référence 12–16\n".encode()
    return line * (PAST_THE_HEAD // len(line) + 10)


def late_accents_csv_bytes():
    """A Windows-1252 CSV whose first accented name comes after 70 KiB of ASCII rows."""
    return b"2024-01-05,Haemoglobin,12.5,g/dL\r\n" * (PAST_THE_HEAD // 34) + "Müller,Zoë,€\r\n".encode(
        "cp1252"
    )


def utf16_text_bytes():
    """A text file as Notepad saves it in "Unicode": UTF-16 with a byte order mark."""
    return b"\xff\xfe" + "Résultats du laboratoire\r\n".encode("utf-16-le") * 200


def text_then_bytes(tail):
    """Plain text for 70 KiB, then `tail`."""
    return b"Lab results are normal.\n" * (PAST_THE_HEAD // 24) + tail


def text_then_executable_bytes():
    return text_then_bytes(exe_bytes())


def text_then_nul_bytes():
    return text_then_bytes(b"normal\x00normal\n")


def text_then_script_bytes():
    return text_then_bytes(b"<script>fetch('/api/')</script>\n")


def utf8_then_latin1_bytes():
    """UTF-8 for 70 KiB, then a byte that is not UTF-8: two encodings in one file."""
    return long_text_bytes() + "Müller\n".encode("latin-1")


def pdf_untyped_object_stream_with_script_bytes():
    """A script in an object stream that says neither its type nor its filter in full (/Fl)."""
    return pdf_document(
        b"/OpenAction 6 0 R",
        object_stream=[b"<< /S /JavaScript /JS (app.alert(1)) >>"],
        object_stream_type=b"/Filter /Fl",
    )


def xls_with_macros_bytes():
    """An Excel 97-2003 workbook with a VBA project in _VBA_PROJECT_CUR, as Excel stores one."""
    # A BIFF8 BOF record (workbook globals), which is how a Workbook stream starts.
    workbook = struct.pack("<HHHHHHII", 0x0809, 16, 0x0600, 0x0005, 0x0DBB, 0x07CC, 0, 0x0006)
    return compound_file_tree(
        [("Workbook", workbook), ("_VBA_PROJECT_CUR", [("VBA", [("dir", b"\x01\x00" + b"\x00" * 30)])])]
    )


def ole_with_looping_fat_bytes():
    """A Word 97-2003 file with a VBA project, whose directory's chain loops back to its start
    after the first sector: a reader that follows it never ends, one that stops early sees no macro."""
    data = bytearray(doc_with_macros_bytes())
    (directory,) = struct.unpack_from("<I", data, 48)
    fat_at = (struct.unpack_from("<I", data, 76)[0] + 1) * 512
    second = struct.unpack_from("<I", data, fat_at + 4 * directory)[0]
    struct.pack_into("<I", data, fat_at + 4 * second, directory)
    return bytes(data)


def pdf_with_image_bytes(size, catalog=b""):
    """A one-page PDF of about `size` bytes, nearly all of it one image's stream of random bytes."""
    pixels = random.Random(size).randbytes(size)
    image = b"<< /Type /XObject /Subtype /Image /Width %d /Height 1 /BitsPerComponent 8 " % len(pixels)
    image += b"/ColorSpace /DeviceGray /Length %d >>\nstream\n" % len(pixels) + pixels + b"\nendstream"
    return pdf_document(catalog, [image])


def large_compound_file_bytes(stream_name, payload, storages=()):
    """An OLE2 compound file (512-byte sectors) holding one stream of any size, and empty storages:
    its FAT takes many sectors, past the 109 the header lists, so the rest are found by DIFAT sectors."""
    sector, per_sector = 512, 128
    end_of_chain, fat_mark, difat_mark, free = 0xFFFFFFFE, 0xFFFFFFFD, 0xFFFFFFFC, 0xFFFFFFFF
    data = -(-len(payload) // sector)
    entries = ["Root Entry", stream_name, *storages]
    directory = -(-len(entries) // 4)
    fat_count = difat_count = 0
    while True:  # the table's sectors are listed in the table too: grow it until it holds itself
        total = data + fat_count + difat_count + directory
        needed = -(-total // per_sector)
        extra = -(-max(needed - 109, 0) // (per_sector - 1))
        if (needed, extra) == (fat_count, difat_count):
            break
        fat_count, difat_count = needed, extra
    fat_start, difat_start, directory_start = data, data + fat_count, data + fat_count + difat_count
    fat = [number + 1 for number in range(data - 1)] + [end_of_chain]
    fat += [fat_mark] * fat_count + [difat_mark] * difat_count
    fat += [directory_start + index + 1 for index in range(directory - 1)] + [end_of_chain]
    fat += [free] * (fat_count * per_sector - len(fat))
    fat_numbers = list(range(fat_start, fat_start + fat_count))
    difat = b""
    rest = fat_numbers[109:]
    for index in range(difat_count):
        numbers = rest[index * 127 : (index + 1) * 127]
        following = difat_start + index + 1 if index + 1 < difat_count else end_of_chain
        difat += struct.pack("<128I", *numbers, *[free] * (127 - len(numbers)), following)
    rows = []
    for index, name in enumerate(entries):
        kind = 5 if index == 0 else 2 if index == 1 else 1
        child = 1 if index == 0 else free
        right = index + 1 if 0 < index < len(entries) - 1 else free
        start, size = (0, len(payload)) if index == 1 else (end_of_chain if index == 0 else 0, 0)
        rows.append(_ole_entry(name, kind, child, right, start, size))
    rows += [b"\x00" * 128] * (4 * directory - len(rows))
    header = _ole_header(
        fat_sectors=fat_numbers,
        directory_start=directory_start,
        difat_start=difat_start if difat_count else end_of_chain,
        difat_count=difat_count,
    )
    body = payload.ljust(data * sector, b"\x00")
    return header + body + struct.pack(f"<{len(fat)}I", *fat) + difat + b"".join(rows)


def large_doc_bytes(size, storages=()):
    """A Word 97-2003 file of about `size` bytes: a FIB, then text."""
    text = (b"Referral letter saved by Word 97-2003. " * (size // 39 + 1))[: max(size - 1536, 0)]
    stream = WORD_FIB + text
    return large_compound_file_bytes("WordDocument", stream, storages)
