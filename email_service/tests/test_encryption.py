"""Encryption at rest: the keyring, sealed values and fields, sealed files on disk and on S3 (moto)."""

import base64
import hashlib
import hmac
import io
import os
import subprocess
import sys
import time
import tracemalloc
from functools import partial

import pytest
from django.core.exceptions import FieldError, ImproperlyConfigured, ValidationError
from django.core.files.base import ContentFile, File
from django.core.files.uploadedfile import TemporaryUploadedFile
from django.db import connection, models
from django.db.models.functions import Cast
from django.http import FileResponse
from django.test.utils import isolate_apps

from email_service import delivery
from email_service.encrypted_storage import EncryptedFileSystemStorage, EncryptedS3Storage
from email_service.encryption import (
    CHUNK_BYTES,
    HEADER_BYTES,
    SEALED_CHUNK_BYTES,
    DecryptingReader,
    DecryptionError,
    EncryptingReader,
    UnknownKeyError,
    address_index,
    decrypt_text,
    encrypt_text,
    key_index,
    normalise_address,
    plaintext_size,
)
from email_service.fields import EncryptedCharField, EncryptedGenericIPAddressField, EncryptedTextField
from medcor_backend2.keys import generate_key

KEY_A, KEY_B = generate_key(), generate_key()
MARKER = b"MARKER-7f3c9a-HEALTH"


@pytest.fixture
def keys(settings):
    """Point MEDCOR_ENCRYPTION_KEYS at the given keys, first one encrypting."""

    def use(*keys):
        settings.MEDCOR_ENCRYPTION_KEYS = list(keys)

    use(KEY_A)
    return use


def sealed(data, read_size=-1):
    """Encrypt bytes through EncryptingReader, reading it `read_size` bytes at a time."""
    reader = EncryptingReader(io.BytesIO(data))
    if read_size < 0:
        return reader.read()
    return b"".join(iter(lambda: reader.read(read_size), b""))


class ShortReads(io.RawIOBase):
    """A seekable file that returns at most `limit` bytes per read, as network storages may."""

    def __init__(self, data, limit=1000):
        super().__init__()
        self._data, self._limit, self._position = data, limit, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=io.SEEK_SET):
        self._position = offset if whence == io.SEEK_SET else len(self._data) + offset
        return self._position

    def read(self, size=-1):
        size = self._limit if size < 0 else min(size, self._limit)
        data = self._data[self._position : self._position + size]
        self._position += len(data)
        return data


def read_all(reader, size):
    """Read a file to its end `size` bytes at a time."""
    return b"".join(iter(lambda: reader.read(size), b""))


def opened(data):
    return DecryptingReader(io.BytesIO(data), len(data))


# --- text values --------------------------------------------------------------------------


def test_text_round_trips_and_differs_on_every_encryption(keys):
    text = "Jöhn Dœ — 心臓 " + MARKER.decode()
    first, second = encrypt_text(text), encrypt_text(text)
    assert first != second
    assert first.isascii() and first.startswith("enc1:")
    assert MARKER.decode() not in first
    assert decrypt_text(first) == decrypt_text(second) == text
    assert decrypt_text(encrypt_text("")) == ""


def test_every_changed_byte_of_a_value_is_detected_never_garbage(keys):
    value = encrypt_text("chest pain since Monday")
    raw = base64.urlsafe_b64decode(value[5:])
    for position in range(len(raw)):
        changed = bytearray(raw)
        changed[position] ^= 0x01
        with pytest.raises(DecryptionError) as caught:
            decrypt_text("enc1:" + base64.urlsafe_b64encode(bytes(changed)).decode())
        # The first four bytes are the key id: a changed one names a key nobody has.
        expected = "unknown key" if position < 4 else "failed authentication"
        assert expected in str(caught.value)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("plain text", "not an encrypted value"),
        ("enc1:!!!", "not valid base64"),
        ("enc1:" + base64.urlsafe_b64encode(b"short").decode(), "too short"),
    ],
)
def test_malformed_values_say_what_is_wrong(keys, value, problem):
    with pytest.raises(DecryptionError, match=problem):
        decrypt_text(value)


def test_rotation_first_key_encrypts_every_key_decrypts(keys):
    old = encrypt_text("written under A")
    keys(KEY_B, KEY_A)
    new = encrypt_text("written under B")
    assert (key_index(old), key_index(new)) == (1, 0)
    assert decrypt_text(old) == "written under A"
    keys(KEY_B)
    assert key_index(old) is None
    with pytest.raises(UnknownKeyError, match="unknown key"):
        decrypt_text(old)
    assert decrypt_text(new) == "written under B"


def test_bad_key_settings_fail_clearly_without_showing_the_key(keys):
    keys("not-a-key-at-all-secret")
    with pytest.raises(ImproperlyConfigured) as caught:
        encrypt_text("x")
    assert "MEDCOR_ENCRYPTION_KEYS" in str(caught.value) and "Fernet.generate_key" in str(caught.value)
    assert "not-a-key-at-all-secret" not in str(caught.value)
    keys(KEY_A, KEY_A)
    with pytest.raises(ImproperlyConfigured, match="twice"):
        encrypt_text("x")


def test_settings_refuse_to_start_without_keys_outside_debug(tmp_path):
    base = {k: v for k, v in os.environ.items() if not k.startswith("MEDCOR_")}
    base.update(DJANGO_DEBUG="false", DJANGO_SECRET_KEY="x", MEDCOR_VAR_DIR=str(tmp_path / "var"))
    code = "import django; django.setup(); from django.conf import settings; print(settings.MEDCOR_INDEX_KEY)"

    def run(**env):
        return subprocess.run(
            [sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, timeout=60
        )

    missing = run()
    assert missing.returncode != 0
    assert "MEDCOR_ENCRYPTION_KEYS is required when DJANGO_DEBUG is false" in missing.stderr
    assert "Fernet.generate_key" in missing.stderr
    bad = run(MEDCOR_ENCRYPTION_KEYS=f"{KEY_A},short", MEDCOR_INDEX_KEY=KEY_B)
    assert "key 2 is not 32 bytes" in bad.stderr
    fine = run(MEDCOR_ENCRYPTION_KEYS=f"{KEY_A},{KEY_B}", MEDCOR_INDEX_KEY=KEY_B)
    assert fine.returncode == 0 and fine.stdout.strip() == KEY_B
    # In debug, development keys are made once under var/ and every later process reads the same.
    first, second = run(DJANGO_DEBUG="true"), run(DJANGO_DEBUG="true")
    assert first.returncode == 0 and first.stdout == second.stdout
    kept = (tmp_path / "var" / "dev-keys.env").read_text()
    assert f"MEDCOR_INDEX_KEY={first.stdout.strip()}" in kept
    assert oct((tmp_path / "var" / "dev-keys.env").stat().st_mode & 0o777) == "0o600"


# --- the address index --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "mailbox"),
    [
        ("Victim@Example.org", "victim@example.org"),
        ("victim+1@example.org", "victim@example.org"),
        ("v.ictim@example.org", "v.ictim@example.org"),
        ("V.Ictim+news@GMail.com", "victim@gmail.com"),
        ("v.i.c.t.i.m@googlemail.com", "victim@gmail.com"),
        (" victim@example.org. ", "victim@example.org"),
        ("+tag@example.org", "+tag@example.org"),
        ("no-at-sign", "no-at-sign"),
    ],
)
def test_normalise_address_gives_the_mailbox(address, mailbox):
    assert normalise_address(address) == mailbox


def test_address_index_is_a_keyed_hash_of_the_mailbox(keys, settings):
    index = address_index("victim@gmail.com")
    secret = base64.urlsafe_b64decode(settings.MEDCOR_INDEX_KEY)
    assert index == hmac.new(secret, b"victim@gmail.com", hashlib.sha256).hexdigest()
    for variant in ("VICTIM@gmail.com", "victim+1@gmail.com", "v.ictim@googlemail.com"):
        assert address_index(variant) == index
    assert address_index("victim2@gmail.com") != index
    keys(KEY_B, KEY_A)  # rotating the encryption keys leaves the index alone
    assert address_index("victim@gmail.com") == index
    settings.MEDCOR_INDEX_KEY = generate_key()
    assert address_index("victim@gmail.com") != index


# --- files --------------------------------------------------------------------------------

SIZES = [0, 1, 1000, CHUNK_BYTES - 1, CHUNK_BYTES, CHUNK_BYTES + 1, 3 * CHUNK_BYTES, 3 * CHUNK_BYTES + 17]


@pytest.mark.parametrize("size", SIZES)
def test_files_round_trip_through_short_reads_with_plaintext_size_known(keys, size):
    data = os.urandom(size)
    for read_size in (-1, 1000, SEALED_CHUNK_BYTES + 3):
        ciphertext = sealed(data, read_size)
        assert plaintext_size(len(ciphertext)) == size
        reader = DecryptingReader(ShortReads(ciphertext), len(ciphertext))
        assert reader.size == size
        assert read_all(reader, 4099) == data


def test_a_file_is_sealed_not_stored(keys):
    data = MARKER * 10_000
    ciphertext = sealed(data)
    assert ciphertext.startswith(b"MCEF\x01") and MARKER not in ciphertext
    assert sealed(data) != ciphertext  # a new salt each time


def test_seek_and_tell_address_the_plaintext(keys):
    data = os.urandom(3 * CHUNK_BYTES + 100)
    reader = opened(sealed(data))
    reader.seek(CHUNK_BYTES * 2 - 10)
    assert reader.read(20) == data[CHUNK_BYTES * 2 - 10 : CHUNK_BYTES * 2 + 10]
    assert reader.seek(0, io.SEEK_END) == len(data) and reader.read(10) == b""
    reader.seek(5)
    assert reader.tell() == 5 and reader.read() == data[5:]


def _chunks(ciphertext):
    body = ciphertext[HEADER_BYTES:]
    return ciphertext[:HEADER_BYTES], [
        body[i : i + SEALED_CHUNK_BYTES] for i in range(0, len(body), SEALED_CHUNK_BYTES)
    ]


def test_changed_reordered_dropped_or_added_chunks_are_detected(keys):
    data = os.urandom(3 * CHUNK_BYTES + 100)
    ciphertext = sealed(data)
    header, chunks = _chunks(ciphertext)
    other_header, other_chunks = _chunks(sealed(data))

    def flip(position):
        changed = bytearray(ciphertext)
        changed[position] ^= 0x80
        return bytes(changed)

    tampered = {
        "a byte of chunk 1": flip(HEADER_BYTES + SEALED_CHUNK_BYTES + 500),
        "a tag": flip(HEADER_BYTES + SEALED_CHUNK_BYTES - 1),
        "the salt": flip(HEADER_BYTES - 1),
        "the version": flip(4),
        "chunks 1 and 2 swapped": header + chunks[0] + chunks[2] + chunks[1] + chunks[3],
        "the last chunk dropped": header + b"".join(chunks[:3]),
        "a chunk appended": ciphertext + chunks[1],
        "cut inside a chunk": ciphertext[:-50],
        "a chunk from another file": header + chunks[0] + other_chunks[1] + chunks[2] + chunks[3],
    }
    for what, changed in tampered.items():
        with pytest.raises(DecryptionError) as caught:
            reader = opened(changed)
            reader.read()
        assert "encrypted file" in str(caught.value), what
    with pytest.raises(DecryptionError, match="not an encrypted file"):
        opened(flip(0))
    with pytest.raises(DecryptionError, match="truncated"):
        opened(ciphertext[: HEADER_BYTES + 10])


def test_a_changed_chunk_stops_the_stream_before_its_bytes(keys):
    data = os.urandom(3 * CHUNK_BYTES)
    changed = bytearray(sealed(data))
    changed[HEADER_BYTES + 2 * SEALED_CHUNK_BYTES + 5] ^= 1
    reader = opened(bytes(changed))
    assert reader.read(2 * CHUNK_BYTES) == data[: 2 * CHUNK_BYTES]  # the intact chunks stream out
    with pytest.raises(DecryptionError, match="at chunk 2"):
        reader.read(1)


def test_an_empty_file_is_still_authenticated(keys):
    ciphertext = bytearray(sealed(b""))
    assert opened(bytes(ciphertext)).read() == b""
    ciphertext[-1] ^= 1
    with pytest.raises(DecryptionError):
        opened(bytes(ciphertext))


def test_ten_megabytes_stream_in_bounded_memory(keys):
    """Encrypt and decrypt 10 MB: the peak of Python allocations stays a few chunks, not the file."""
    size = 10 * 1024 * 1024
    data = os.urandom(size)
    ciphertext = sealed(data)  # made before measuring: the input of the decryption

    def measure(open_reader):
        """Return the digests of what a reader yields (twice), its MB/s, and its peak of traced memory."""
        digests, seconds, peak = [], 0.0, 0
        for traced in (False, True):  # timed untraced: tracemalloc slows every allocation
            digest, reader = hashlib.sha256(), open_reader()
            if traced:
                tracemalloc.start()
            try:
                started = time.perf_counter()
                for piece in iter(partial(reader.read, CHUNK_BYTES), b""):
                    digest.update(piece)
                if traced:
                    peak = tracemalloc.get_traced_memory()[1]
                else:
                    seconds = time.perf_counter() - started
            finally:
                tracemalloc.stop()
            digests.append(digest.hexdigest())
        return digests, size / seconds / 1e6, peak

    encrypted_digests, encrypt_rate, encrypt_peak = measure(lambda: EncryptingReader(io.BytesIO(data)))
    plain_digests, decrypt_rate, decrypt_peak = measure(
        lambda: DecryptingReader(io.BytesIO(ciphertext), len(ciphertext))
    )
    plain_digest, encrypted_digest = plain_digests[0], encrypted_digests[0]
    assert plain_digests[1] == plain_digest and encrypted_digests[1] != encrypted_digest  # a new salt
    assert plain_digest == hashlib.sha256(data).hexdigest()
    assert encrypted_digest != hashlib.sha256(ciphertext).hexdigest()
    assert encrypt_peak < 1024 * 1024 and decrypt_peak < 1024 * 1024
    print(
        f"\n10 MB: encrypt {encrypt_rate:.0f} MB/s, peak {encrypt_peak / 1024:.0f} KiB; "
        f"decrypt {decrypt_rate:.0f} MB/s, peak {decrypt_peak / 1024:.0f} KiB"
    )


# --- model fields -------------------------------------------------------------------------


@pytest.fixture
def secret_model(transactional_db, keys):
    """A model with every encrypted field, and its table, made for this test and then dropped."""
    with isolate_apps("email_service"):

        class Secret(models.Model):
            name = EncryptedCharField(max_length=10)
            body = EncryptedTextField(blank=True)
            ip = EncryptedGenericIPAddressField(null=True, blank=True)

            class Meta:
                app_label = "email_service"
                db_table = "test_encryption_secret"

            def __str__(self):
                return str(self.pk)

        with connection.schema_editor() as editor:
            editor.create_model(Secret)
        try:
            yield Secret
        finally:
            with connection.schema_editor() as editor:
                editor.delete_model(Secret)


def _raw_row(pk):
    with connection.cursor() as cursor:
        cursor.execute("SELECT name, body, ip FROM test_encryption_secret WHERE id = %s", [pk])
        return cursor.fetchone()


def test_fields_store_ciphertext_and_give_plaintext(secret_model):
    row = secret_model.objects.create(name="Zoë ♥ 10ch", body=MARKER.decode() * 50, ip="2001:0db8::0001")
    name, body, ip = _raw_row(row.pk)
    assert all(value.startswith("enc1:") for value in (name, body, ip))
    assert MARKER.decode() not in body and "2001" not in ip
    fetched = secret_model.objects.get(pk=row.pk)
    assert (fetched.name, fetched.body, fetched.ip) == ("Zoë ♥ 10ch", MARKER.decode() * 50, "2001:db8::1")
    assert list(secret_model.objects.values_list("name", flat=True)) == ["Zoë ♥ 10ch"]
    secret_model.objects.filter(pk=row.pk).update(body="updated")
    assert _raw_row(row.pk)[1].startswith("enc1:")
    assert secret_model.objects.get(pk=row.pk).body == "updated"


def test_empty_and_null_stay_as_they_are(secret_model):
    row = secret_model.objects.create(name="x", body="", ip=None)
    assert _raw_row(row.pk)[1:] == ("", None)
    assert secret_model.objects.filter(ip__isnull=True).count() == 1


def test_max_length_and_address_are_checked_on_the_plaintext(secret_model):
    secret_model(name="ten chars!", body="").full_clean()  # its ciphertext is far longer than 10
    with pytest.raises(ValidationError) as caught:
        secret_model(name="eleven chars", body="", ip="999.1.1.1").full_clean()
    assert set(caught.value.message_dict) == {"name", "ip"}


def test_lookups_on_ciphertext_fail_loudly_instead_of_matching_nothing(secret_model):
    with pytest.raises(FieldError):
        list(secret_model.objects.filter(name="x"))
    with pytest.raises(FieldError):
        list(secret_model.objects.filter(body__icontains="x"))


def test_a_changed_value_in_the_database_raises_when_read(secret_model):
    row = secret_model.objects.create(name="x", body="private")
    body = _raw_row(row.pk)[1]
    changed = body[:-6] + ("A" if body[-6] != "A" else "B") + body[-5:]
    with connection.cursor() as cursor:
        cursor.execute("UPDATE test_encryption_secret SET body = %s WHERE id = %s", [changed, row.pk])
    with pytest.raises(DecryptionError, match="failed authentication"):
        secret_model.objects.get(pk=row.pk)


def test_rotation_reads_the_stored_values_and_rewrites_them_under_the_first_key(secret_model, keys):
    row = secret_model.objects.create(name="x", body="under A")
    keys(KEY_B, KEY_A)
    # What a rotation reads: the stored value, cast so that no field decrypts it on the way.
    stored = secret_model.objects.annotate(stored=Cast("body", models.TextField())).values_list(
        "stored", flat=True
    )
    assert [key_index(value) for value in stored] == [1]
    row = secret_model.objects.get(pk=row.pk)
    row.save()
    assert [key_index(value) for value in stored.all()] == [0]
    keys(KEY_B)
    assert secret_model.objects.get(pk=row.pk).body == "under A"


def test_fields_deconstruct_and_make_form_fields_like_their_plain_kinds():
    from django import forms

    _, path, _, kwargs = EncryptedCharField(max_length=10).deconstruct()
    assert (path, kwargs) == ("email_service.fields.EncryptedCharField", {"max_length": 10})
    assert EncryptedGenericIPAddressField(null=True).deconstruct()[3] == {"null": True}
    char = EncryptedCharField(max_length=10).formfield()
    assert (
        type(char) is forms.CharField and char.max_length == 10 and isinstance(char.widget, forms.TextInput)
    )
    assert isinstance(EncryptedTextField().formfield().widget, forms.Textarea)
    assert type(EncryptedGenericIPAddressField().formfield()) is forms.GenericIPAddressField


# --- the encrypting storage ---------------------------------------------------------------


@pytest.fixture
def storage(tmp_path, keys):
    return EncryptedFileSystemStorage(location=tmp_path / "media")


def test_saved_files_are_sealed_on_disk_and_read_back_as_a_stream(storage, tmp_path):
    data = MARKER + os.urandom(2 * CHUNK_BYTES) + MARKER
    name = storage.save("email_attachments/report.pdf", ContentFile(data))
    on_disk = (tmp_path / "media" / name).read_bytes()
    assert MARKER not in on_disk and on_disk.startswith(b"MCEF")
    assert storage.size(name) == len(data)
    with storage.open(name) as handle:
        assert handle.size == len(data)
        assert b"".join(handle.chunks(10_000)) == data
    with storage.open(name) as handle:
        assert b"".join(handle) == data  # line iteration, as Django's File does it


def test_a_large_upload_from_disk_is_sealed_while_it_is_copied(storage, tmp_path):
    source = tmp_path / "upload.bin"
    source.write_bytes(os.urandom(CHUNK_BYTES * 5 + 3))
    with open(source, "rb") as handle:
        name = storage.save("big.bin", File(handle))
    with storage.open(name) as handle:
        assert hashlib.sha256(handle.read()).digest() == hashlib.sha256(source.read_bytes()).digest()


def test_an_upload_spooled_to_a_temporary_file_is_sealed_not_moved(storage, tmp_path):
    # FileSystemStorage moves a TemporaryUploadedFile into place: that would store the plaintext.
    upload = TemporaryUploadedFile("scan.pdf", "application/pdf", 0, None)
    upload.write(MARKER * 1000)
    upload.flush()
    name = storage.save("scan.pdf", upload)
    assert MARKER not in (tmp_path / "media" / name).read_bytes()
    assert os.path.exists(upload.temporary_file_path())
    assert storage.open(name).read() == MARKER * 1000
    upload.close()


def test_file_response_streams_plaintext_with_its_length(storage):
    data = os.urandom(CHUNK_BYTES * 2 + 5)
    name = storage.save("a.bin", ContentFile(data))
    response = FileResponse(storage.open(name), as_attachment=True, filename="a.bin")
    assert response["Content-Length"] == str(len(data))
    assert b"".join(response.streaming_content) == data
    response.close()


def test_delivery_base64_lines_decode_to_the_plaintext(storage, monkeypatch):
    data = os.urandom(300_001)
    name = storage.save("a.bin", ContentFile(data))
    monkeypatch.setattr(delivery, "default_storage", storage)
    lines = b"".join(delivery._encoded_lines(name))
    assert base64.b64decode(lines) == data
    assert len(lines) == delivery._encoded_size(storage.size(name))


def test_reencrypt_moves_a_file_to_the_first_key(storage, keys):
    data = os.urandom(CHUNK_BYTES + 9)
    name = storage.save("old.bin", ContentFile(data))
    keys(KEY_B, KEY_A)
    assert storage.key_index(name) == 1
    copy = storage.reencrypt(name)
    assert copy != name and storage.key_index(copy) == 0
    assert storage.reencrypt(copy) is None
    keys(KEY_B)  # the old key removed: the copy reads, the original is reported
    assert storage.open(copy).read() == data
    assert storage.key_index(name) is None
    with pytest.raises(UnknownKeyError):
        storage.open(name)


def test_a_changed_byte_on_disk_raises_when_read(storage, tmp_path):
    name = storage.save("a.bin", ContentFile(os.urandom(1000)))
    path = tmp_path / "media" / name
    changed = bytearray(path.read_bytes())
    changed[HEADER_BYTES + 10] ^= 1
    path.write_bytes(bytes(changed))
    with pytest.raises(DecryptionError, match="authentication"), storage.open(name) as handle:
        handle.read()


def test_encrypted_files_open_only_for_reading(storage):
    name = storage.save("a.bin", ContentFile(b"x"))
    with pytest.raises(ValueError, match="only for reading"):
        storage.open(name, "wb")


# --- S3: django-storages against moto's server on loopback -----------------------------------


@pytest.fixture
def s3(s3_endpoint, s3_bucket, keys):
    from boto3.s3.transfer import TransferConfig

    client, bucket = s3_bucket
    storage = EncryptedS3Storage(
        bucket_name=bucket,
        endpoint_url=s3_endpoint,
        access_key="test",
        secret_key="test",
        region_name="us-east-1",
        file_overwrite=False,
        # Small parts so that a test file goes up in several: S3's smallest part is 5 MiB.
        transfer_config=TransferConfig(
            multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024
        ),
    )
    return storage, client, bucket


def test_s3_objects_are_sealed_in_the_bucket_and_stream_back_intact(s3, tmp_path):
    storage, client, bucket = s3
    data = MARKER + os.urandom(6 * 1024 * 1024) + MARKER  # two parts of a multipart upload
    source = tmp_path / "upload.pdf"
    source.write_bytes(data)
    storage.save("warm-up.bin", ContentFile(b"x"))  # botocore loads its models on first use
    tracemalloc.start()
    try:
        with open(source, "rb") as upload:
            name = storage.save("email_attachments/2026/12/01/scan.pdf", File(upload))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Spooled to disk sealed, then sent from there: bounded by the part size, under the file's.
    assert peak < len(data), f"peak {peak} bytes while saving {len(data)}"
    print(f"\nS3, {len(data) / 1e6:.1f} MB saved: peak {peak / 1024:.0f} KiB")
    stored = client.get_object(Bucket=bucket, Key=name)["Body"].read()
    assert stored.startswith(b"MCEF") and MARKER not in stored
    assert storage.size(name) == len(data)
    digest = hashlib.sha256()
    with storage.open(name) as handle:
        for piece in iter(lambda: handle.read(57 * 1024), b""):
            digest.update(piece)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()


def test_s3_reads_stream_in_bounded_memory_and_seek(s3):
    storage, _, _ = s3
    data = os.urandom(4 * 1024 * 1024 + 123)
    name = storage.save("big.bin", ContentFile(data))
    digest = hashlib.sha256()
    tracemalloc.start()
    try:
        with storage.open(name) as handle:
            for piece in iter(partial(handle.read, 57 * 1024), b""):
                digest.update(piece)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    assert peak < 1024 * 1024, f"peak {peak} bytes while reading a 4 MB object"
    print(f"\nS3, 4 MB object read as a stream: peak {peak / 1024:.0f} KiB")
    response = FileResponse(storage.open(name), as_attachment=True, filename="big.bin")
    assert response["Content-Length"] == str(len(data))
    response.close()
    with storage.open(name) as handle:
        handle.seek(3 * CHUNK_BYTES + 7)
        assert handle.read(CHUNK_BYTES) == data[3 * CHUNK_BYTES + 7 : 4 * CHUNK_BYTES + 7]
    with pytest.raises(FileNotFoundError):
        storage.open("missing.bin")


def test_s3_rotation_and_a_changed_object(s3, keys):
    storage, client, bucket = s3
    data = os.urandom(CHUNK_BYTES * 2)
    name = storage.save("a.bin", ContentFile(data))
    keys(KEY_B, KEY_A)
    copy = storage.reencrypt(name)
    assert copy != name and storage.key_index(copy) == 0
    storage.delete(name)
    assert not storage.exists(name)
    keys(KEY_B)
    assert storage.open(copy).read() == data
    changed = bytearray(client.get_object(Bucket=bucket, Key=copy)["Body"].read())
    changed[-1] ^= 1
    client.put_object(Bucket=bucket, Key=copy, Body=bytes(changed))
    with pytest.raises(DecryptionError, match="authentication"):
        storage.open(copy).read()
