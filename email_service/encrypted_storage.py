"""Storages that keep every file sealed (encryption.py's chunked format) and read it back as a stream.

`EncryptedStorage` goes in front of any Django storage class whose `_save` reads its content
with `read()` or `chunks()` and whose `_open` returns a readable file: the file system and
django-storages' S3 backend are the two given here. A name refers to the sealed object; `size()`
answers the plaintext size, derived from the stored size without reading the file.
"""

import io
import os
import shutil
import tempfile

from botocore.exceptions import ClientError
from django.conf import settings
from django.core.files import File
from django.core.files.storage import FileSystemStorage
from storages.backends.s3 import S3Storage
from storages.utils import clean_name

from .encryption import (
    CHUNK_BYTES,
    FILE_MAGIC,
    HEADER_BYTES,
    DecryptingReader,
    EncryptingReader,
    file_key_index,
    plaintext_size,
)


class EncryptedStorage:
    """Mixin over a storage class: encrypt as files are saved, decrypt as they are read."""

    def _save(self, name, content):
        return super()._save(name, File(EncryptingReader(content), name=name))

    def _open(self, name, mode="rb"):
        if any(flag in mode for flag in "wa+x"):
            raise ValueError("encrypted files are written with save() and opened only for reading")
        raw, stored_size = self._open_sealed(name)
        try:
            return File(DecryptingReader(raw, stored_size), name=name)
        except BaseException:
            raw.close()
            raise

    def _open_sealed(self, name):
        """Open the stored (sealed) bytes of a file for reading; return the file and their size."""
        return super()._open(name, "rb"), super().size(name)

    def size(self, name):
        return plaintext_size(super().size(name))

    def key_index(self, name):
        """Return the position in MEDCOR_ENCRYPTION_KEYS of the key a file is under, None if unknown."""
        with self._open_sealed(name)[0] as raw:
            return file_key_index(raw.read(HEADER_BYTES))

    def reencrypt(self, name):
        """Save a copy of a file under the first key and return its name; None if it is already.

        The original stays until the caller, having pointed its row at the copy, deletes it: an
        interrupted rotation leaves every row with a readable file.
        """
        if self.key_index(name) == 0:
            return None
        # A name of its own even where the storage overwrites (S3's default), so the caller's
        # delete of the original can never remove the copy.
        copy_name = self.get_alternative_name(*os.path.splitext(name))
        with self.open(name) as plaintext:
            return self.save(copy_name, plaintext)

    def is_sealed(self, name):
        """Tell whether a stored file is in the sealed format (a file from before encryption is not)."""
        with self._open_sealed(name)[0] as raw:
            return raw.read(len(FILE_MAGIC)) == FILE_MAGIC

    def seal(self, name):
        """Save a sealed copy of a plaintext file stored before encryption; return the copy's name."""
        with self._open_sealed(name)[0] as raw:
            return self.save(self.get_alternative_name(*os.path.splitext(name)), File(raw, name=name))

    def unseal(self, name):
        """Save a plaintext copy of a sealed file, for undoing encryption; return the copy's name."""
        copy_name = self.get_available_name(self.get_alternative_name(*os.path.splitext(name)))
        with self.open(name) as plaintext:
            return super()._save(copy_name, plaintext)


class EncryptedFileSystemStorage(EncryptedStorage, FileSystemStorage):
    """FileSystemStorage (MEDIA_ROOT) with every file sealed."""


class EncryptedS3Storage(EncryptedStorage, S3Storage):
    """django-storages' S3Storage with every object sealed, read as a stream of ranged GETs."""

    def _save(self, name, content):
        # s3transfer holds each part of a file object in memory (about twice a 10 MB file at the
        # peak); from a file name it reads the parts as it sends them. So the sealed bytes go to
        # a temporary file first, and up from there.
        cleaned_name = clean_name(name)
        key = self._normalize_name(cleaned_name)
        params = {**self._get_write_parameters(key, content), "ContentType": "application/octet-stream"}
        with tempfile.NamedTemporaryFile(dir=settings.FILE_UPLOAD_TEMP_DIR, suffix=".sealed") as spool:
            shutil.copyfileobj(EncryptingReader(content), spool, CHUNK_BYTES)
            spool.flush()
            self.bucket.Object(key).upload_file(spool.name, ExtraArgs=params, Config=self.transfer_config)
        return cleaned_name

    def _open_sealed(self, name):
        # S3File would first download the whole object into a temporary file (in memory, with
        # django-storages' defaults); a ranged GET streams it, and a seek starts a new one.
        obj = self.bucket.Object(self._normalize_name(clean_name(name)))
        try:
            size = obj.content_length
        except ClientError as err:
            if err.response["ResponseMetadata"]["HTTPStatusCode"] == 404:
                raise FileNotFoundError(f"File does not exist: {name}") from None
            raise
        return S3ObjectReader(obj, size), size


class S3ObjectReader(io.RawIOBase):
    """A seekable read-only file over one S3 object: each read continues one ranged GET."""

    def __init__(self, obj, size):
        super().__init__()
        self._obj, self._size = obj, size
        self._position, self._body = 0, None

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self._position

    def seek(self, offset, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        position = max(0, base + offset)
        if position != self._position:
            self._close_body()
            self._position = position
        return self._position

    def read(self, size=-1):
        if self._position >= self._size or size == 0:
            return b""
        if self._body is None:
            self._body = self._obj.get(Range=f"bytes={self._position}-")["Body"]
        data = self._body.read(None if size is None or size < 0 else size)
        self._position += len(data)
        return data

    def readinto(self, buffer):
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self):
        self._close_body()
        super().close()

    def _close_body(self):
        if self._body is not None:
            self._body.close()
            self._body = None
