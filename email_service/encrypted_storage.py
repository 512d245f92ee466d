"""Storages that keep every file sealed (encryption.py's chunked format) and read it back as a stream.

`EncryptedStorage` goes in front of any Django storage class whose `_save` reads its content
with `read()` or `chunks()` and whose `_open` returns a readable file: the file system and
django-storages' S3 backend are the two given here. A name refers to the sealed object; `size()`
answers the plaintext size, derived from the stored size without reading the file.
"""

import os

from django.conf import settings
from django.core.files import File
from django.core.files.storage import FileSystemStorage
from storages.backends.s3 import S3Storage

from .encryption import HEADER_BYTES, DecryptingReader, EncryptingReader, file_key_index, plaintext_size


class EncryptedStorage:
    """Mixin over a storage class: encrypt as files are saved, decrypt as they are read."""

    def _save(self, name, content):
        return super()._save(name, File(EncryptingReader(content), name=name))

    def _open(self, name, mode="rb"):
        if any(flag in mode for flag in "wa+x"):
            raise ValueError("encrypted files are written with save() and opened only for reading")
        raw = super()._open(name, "rb")
        try:
            return File(DecryptingReader(raw, super().size(name)), name=name)
        except BaseException:
            raw.close()
            raise

    def size(self, name):
        return plaintext_size(super().size(name))

    def key_index(self, name):
        """Return the position in MEDCOR_ENCRYPTION_KEYS of the key a file is under, None if unknown."""
        with super()._open(name, "rb") as raw:
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


class EncryptedFileSystemStorage(EncryptedStorage, FileSystemStorage):
    """FileSystemStorage (MEDIA_ROOT) with every file sealed."""


class EncryptedS3Storage(EncryptedStorage, S3Storage):
    """django-storages' S3Storage with every object sealed."""

    def get_default_settings(self):
        defaults = super().get_default_settings()
        # S3File downloads an object into a SpooledTemporaryFile; django-storages' default of 0
        # never spills it to disk, which would hold a whole attachment in memory.
        if not defaults["max_memory_size"]:
            defaults["max_memory_size"] = settings.FILE_UPLOAD_MAX_MEMORY_SIZE
        return defaults
