"""Content checks that read what they check: office zips unpacked for real, OLE2 directories read,
PDFs read to the end for what can act, text files read in full."""

import io
import tempfile
import tracemalloc
import zipfile

import pytest
from django.core.exceptions import ValidationError
from django.core.files.uploadedfile import SimpleUploadedFile, TemporaryUploadedFile
from rest_framework.test import APIClient

from email_service import validators
from email_service.models import EmailRequest
from email_service.validators import validate_attachment

from . import files

URL = "/api/email/emails/"
FORM = {"full_name": "Jane Roe", "email": "jane@example.com", "subject": "Results", "message": "Attached."}
OOXML = "application/vnd.openxmlformats-officedocument"
SCRIPT = "contains script, a launch action or an embedded file"

# (name sent, maker, words the 400 must contain)
REFUSED = [
    ("letter.docx", files.docm_as_docx_bytes, "contains macros"),
    ("letter.docx", files.docx_with_hidden_vba_bytes, "contains macros"),
    ("results.docx", files.docx_with_macro_content_type_bytes, "contains macros"),
    ("letter.odt", files.odt_with_basic_macro_bytes, "contains macros"),
    ("old letter.doc", files.doc_with_macros_bytes, "contains macros"),
    ("old results.xls", files.xls_with_macros_bytes, "contains macros"),
    ("letter.docx", files.lying_size_docx_bytes, "unpacks to an unreasonable size"),
    ("letter.docx", files.docx_with_wrong_size_bytes, "damaged"),
    ("referral.pdf", files.pdf_open_action_js_bytes, SCRIPT),
    ("referral.pdf", files.pdf_launch_bytes, SCRIPT),
    ("referral.pdf", files.pdf_embedded_file_bytes, SCRIPT),
    ("referral.pdf", files.pdf_escaped_script_in_object_stream_bytes, SCRIPT),
    ("referral.pdf", files.pdf_script_key_only_bytes, SCRIPT),
    ("referral.pdf", files.pdf_untyped_object_stream_with_script_bytes, SCRIPT),
    ("referral.pdf", files.pdf_incremental_update_with_script_bytes, SCRIPT),
    ("notes.txt", files.text_then_executable_bytes, "contains binary data"),
    ("notes.txt", files.text_then_nul_bytes, "contains binary data"),
    ("notes.txt", files.text_then_script_bytes, "web page markup or script"),
    ("notes.txt", files.utf8_then_latin1_bytes, "not valid UTF-8 throughout"),
]

# Beside the corpus of test_attachments (which stays accepted and is delivered intact there).
ACCEPTED = [
    ("letter.pdf", files.pdf_with_words_like_names_bytes, "application/pdf"),
    ("letter.pdf", files.pdf_document, "application/pdf"),
    ("big scan.pdf", lambda: files.pdf_of_size(10 * 1024 * 1024), "application/pdf"),
    ("report.txt", files.long_text_bytes, "text/plain"),
    ("export.csv", files.late_accents_csv_bytes, "text/csv"),
    ("Unicode.txt", files.utf16_text_bytes, "text/plain"),
    ("results.xlsx", lambda: files.xlsx_bytes(rows=5000), f"{OOXML}.spreadsheetml.sheet"),
    ("big results.xls", lambda: files.xls_bytes(rows=3000), "application/vnd.ms-excel"),
]

pytestmark = pytest.mark.usefixtures("dispatched")


def refusal(data, name):
    with pytest.raises(ValidationError) as caught:
        validate_attachment(SimpleUploadedFile(name, data))
    [error] = caught.value.error_list
    return error


@pytest.mark.django_db
@pytest.mark.parametrize("name, make, reason", REFUSED, ids=[case[1].__name__ for case in REFUSED])
def test_hostile_content_is_a_400_that_says_why_and_leaves_nothing(media_root, name, make, reason):
    upload = SimpleUploadedFile(name, make(), content_type="application/octet-stream")
    response = APIClient().post(URL, {**FORM, "file_attached": upload}, format="multipart")
    assert response.status_code == 400
    [message] = response.json()["file_attached"]
    assert reason in message and "Allowed: .csv" in message
    assert EmailRequest.objects.count() == 0
    assert not media_root.exists() or not [p for p in media_root.rglob("*") if p.is_file()]


@pytest.mark.parametrize("name, make, content_type", ACCEPTED, ids=[case[1].__name__ for case in ACCEPTED])
def test_clean_files_that_look_like_the_hostile_ones_are_accepted(name, make, content_type):
    assert validate_attachment(SimpleUploadedFile(name, make())) == content_type


@pytest.mark.parametrize("on_disk", [False, True], ids=["in memory", "temporary file"])
def test_the_lying_docx_declares_1000_bytes_and_is_stopped_at_the_cap(
    on_disk, monkeypatch, settings, tmp_path
):
    data = files.lying_size_docx_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        declared = sum(info.file_size for info in archive.infolist())
        assert archive.getinfo("word/document.xml").file_size == 1000
    # What the headers say is small and sane: only unpacking shows the gigabyte.
    assert declared < len(data) * validators.MAX_UNPACKED_RATIO
    unpacked = []
    chunks = validators._entry_chunks

    def counting(upload, info):
        for chunk in chunks(upload, info):
            unpacked.append(len(chunk))
            yield chunk

    monkeypatch.setattr(validators, "_entry_chunks", counting)
    if on_disk:
        settings.FILE_UPLOAD_TEMP_DIR = str(tmp_path)
        upload = TemporaryUploadedFile("letter.docx", "application/octet-stream", len(data), None)
        upload.write(data)
        upload.seek(0)
    else:
        upload = SimpleUploadedFile("letter.docx", data)
    with pytest.raises(ValidationError) as caught:
        validate_attachment(upload)
    assert caught.value.error_list[0].code == "zip_bomb"
    # Read in chunks and stopped at the cap: never the whole gigabyte, never more than a chunk over.
    cap = min(validators.MAX_UNPACKED_BYTES, len(data) * validators.MAX_UNPACKED_RATIO)
    assert cap < sum(unpacked) <= cap + validators.CHUNK
    assert max(unpacked) <= validators.CHUNK


def test_too_many_entries_are_refused_before_any_is_unpacked(monkeypatch):
    monkeypatch.setattr(validators, "MAX_ZIP_ENTRIES", 5)
    assert refusal(files.docx_bytes(), "letter.docx").code == "zip_bomb"


def test_the_total_cap_holds_across_entries_that_are_each_small(monkeypatch):
    # Eleven entries, each well under the cap, whose sum is over it: the total is what counts.
    monkeypatch.setattr(validators, "MAX_UNPACKED_BYTES", 1024 * 1024)
    data = files._rezip(
        files.docx_bytes(), add=[(f"word/media/part{i}.xml", b"<a/>" * 25_000) for i in range(11)]
    )
    assert refusal(data, "letter.docx").code == "zip_bomb"


def test_macros_are_refused_with_their_own_code():
    assert refusal(files.docm_as_docx_bytes(), "letter.docx").code == "macro"
    assert refusal(files.odt_with_basic_macro_bytes(), "letter.odt").code == "macro"
    assert refusal(files.doc_with_macros_bytes(), "letter.doc").code == "macro"


def test_an_embedded_macro_enabled_workbook_is_refused():
    embedded = files._rezip(files.xlsx_bytes(), add=[("xl/vbaProject.bin", b"VBA")])
    data = files._rezip(
        files.docx_bytes(), add=[("word/embeddings/Microsoft_Excel_Worksheet.xlsm", embedded)]
    )
    assert refusal(data, "letter.docx").code == "macro"


def test_a_content_types_part_with_a_dtd_is_refused():
    data = files._rezip(
        files.docx_bytes(),
        replace={
            "[Content_Types].xml": lambda xml: xml.replace(
                b"?>", b'?><!DOCTYPE Types [<!ENTITY m "macro">]>', 1
            )
        },
    )
    assert refusal(data, "letter.docx").code == "damaged"


def test_an_object_stream_that_cannot_be_decoded_is_refused():
    data = files.pdf_document(b"/OpenAction 6 0 R", object_stream=[b"<< /S /GoTo /D [3 0 R /Fit] >>"])
    start = data.index(b"stream\n", data.index(b"/ObjStm")) + len(b"stream\n")
    broken = data[:start] + b"\xff" * 8 + data[start + 8 :]
    assert refusal(broken, "letter.pdf").code == "damaged"


def test_a_pdf_bomb_in_an_object_stream_is_refused(monkeypatch):
    monkeypatch.setattr(validators, "MAX_UNPACKED_BYTES", 256 * 1024)
    data = files.pdf_document(object_stream=[b"<< /Padding (" + b"0" * 1024 * 1024 + b") >>"])
    assert refusal(data, "letter.pdf").code == "zip_bomb"


def test_an_object_stream_with_a_predictor_is_refused_as_uncheckable():
    data = files.pdf_document(
        object_stream=[b"<< /S /GoTo /D [3 0 R /Fit] >>"],
        object_stream_type=b"/Type /ObjStm /Filter /FlateDecode /DecodeParms << /Predictor 12 /Columns 4 >>",
    )
    assert refusal(data, "letter.pdf").code == "damaged"


def test_an_ole_directory_chain_that_loops_is_refused_not_followed_forever():
    # libmagic already refuses this file's type; the directory reader must stop on its own too.
    with pytest.raises(validators.ContentRefused) as caught:
        validators.ole_entry_names(io.BytesIO(files.ole_with_looping_fat_bytes()))
    assert caught.value.code == "damaged"
    assert "_VBA_PROJECT" in validators.ole_entry_names(io.BytesIO(files.doc_with_macros_bytes()))


def peak_bytes_of(check, data):
    """Run `check` on `data` kept in a file, as uploads past the memory limit are; return its peak."""
    with tempfile.TemporaryFile() as upload:
        upload.write(data)
        tracemalloc.start()
        try:
            check(upload)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()


TEN_MB = 10 * 1024 * 1024


def test_a_10_mb_pdf_is_read_in_chunks_far_below_its_size():
    data = files.pdf_with_image_bytes(TEN_MB)
    assert len(data) >= TEN_MB
    assert peak_bytes_of(validators.check_pdf, data) < TEN_MB // 3
    # Read to the end all the same: a script after the long image is found.
    with pytest.raises(validators.ContentRefused) as caught:
        peak_bytes_of(
            validators.check_pdf, files.pdf_with_image_bytes(TEN_MB, b"/OpenAction << /JS 6 0 R >>")
        )
    assert caught.value.code == "active_content"


def test_a_10_mb_doc_is_checked_from_its_directory_alone():
    data = files.large_doc_bytes(TEN_MB)
    assert len(data) >= TEN_MB
    assert peak_bytes_of(validators.check_ole_document, data) < TEN_MB // 50
    # Its FAT runs past the header's 109 sectors: the rest are found through the DIFAT sectors.
    assert validators.ole_entry_names(io.BytesIO(data)) == ["Root Entry", "WordDocument"]
    with pytest.raises(validators.ContentRefused) as caught:
        validators.check_ole_document(io.BytesIO(files.large_doc_bytes(TEN_MB, ["Macros"])))
    assert caught.value.code == "macro"


def splits(data, token):
    """Yield the chunk sizes that put a chunk boundary at each place in and around `token`."""
    at = data.index(token)
    yield from range(max(at - 1, 1), at + len(token) + 2)


def pdf_verdict(data):
    try:
        validators.check_pdf(io.BytesIO(data))
    except validators.ContentRefused as refused:
        return refused.code
    return None


SPLIT = [
    ("a name", files.pdf_launch_bytes(), b"/Launch"),
    ("the script key after an open action", files.pdf_script_key_only_bytes(), b"/JS"),
    ("an escaped name", files.pdf_document(b"/OpenAction << /S /J#61vaScript >>"), b"/J#61vaScript"),
    ("a name in an object stream", files.pdf_escaped_script_in_object_stream_bytes(), b"/ObjStm"),
]


@pytest.mark.parametrize(("what", "data", "token"), SPLIT, ids=[case[0] for case in SPLIT])
def test_a_token_split_between_chunks_is_still_found(monkeypatch, what, data, token):
    assert pdf_verdict(data) == "active_content"
    for size in splits(data, token):
        monkeypatch.setattr(validators, "SCAN_CHUNK", size)
        assert pdf_verdict(data) == "active_content", size


def test_names_split_in_an_object_stream_unpacked_piece_by_piece_are_found(monkeypatch):
    data = files.pdf_escaped_script_in_object_stream_bytes()
    monkeypatch.setattr(validators, "SCAN_CHUNK", 5)
    for size in range(1, 24):
        monkeypatch.setattr(validators, "CHUNK", size)
        assert pdf_verdict(data) == "active_content", size


def test_stream_keywords_split_between_chunks_keep_image_data_out_of_the_syntax(monkeypatch):
    # Image data that happens to hold /JS is not syntax; the same bytes after `endstream` are.
    image = b"<< /Subtype /Image /Length 12 >>\r\nstream\r\n/JS 1 0 R /X\nendstream"
    clean = files.pdf_document(objects=[image])
    script = files.pdf_document(objects=[image + b" /JS 1 0 R"])
    for token in (b"stream\r\n", b"endstream"):
        for size in splits(clean, token):
            monkeypatch.setattr(validators, "SCAN_CHUNK", size)
            assert pdf_verdict(clean) is None, size
            assert pdf_verdict(script) == "active_content", size


def test_an_object_stream_split_between_chunks_keeps_its_verdicts(monkeypatch):
    broken = files.pdf_document(b"/OpenAction 6 0 R", object_stream=[b"<< /S /GoTo /D [3 0 R /Fit] >>"])
    start = broken.index(b"stream\n", broken.index(b"/ObjStm")) + len(b"stream\n")
    broken = broken[:start] + b"\xff" * 8 + broken[start + 8 :]
    for size in (7, 64, 300):
        monkeypatch.setattr(validators, "SCAN_CHUNK", size)
        assert pdf_verdict(broken) == "damaged"
        assert pdf_verdict(files.pdf_document(object_stream=[b"<< /S /GoTo >>"])) is None
