"""Encryption at rest: a keyring, sealed text values, files sealed in chunks, a keyed address index.

Keys come from MEDCOR_ENCRYPTION_KEYS, comma-separated Fernet-format keys (32 random bytes,
url-safe base64). The first key encrypts; every key decrypts, so a key can be rotated out once
nothing is left under it. Each key is stretched with HKDF into separate AES-256-GCM keys for text
and for files, and is known by a 4-byte id that every value and file header carries.

A text value is `enc1:` + base64(key id, 12-byte random nonce, ciphertext and GCM tag).

A file is a 25-byte header (magic, version, key id, random salt) and then chunks of 64 KiB of
plaintext, each sealed with a key derived from the salt, its index as the nonce, and the header,
the index and a final-chunk flag as associated data: a changed, reordered, dropped or appended
chunk fails authentication. The plaintext size follows from the stored size alone.
"""

import base64
import binascii
import hashlib
import hmac
import io
import os
import struct
from functools import lru_cache

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.core.exceptions import ImproperlyConfigured

from medcor_backend2.keys import KEY_HOWTO, is_key

from . import conf

TEXT_PREFIX = "enc1:"
KEY_ID_BYTES = 4
NONCE_BYTES = 12
TAG_BYTES = 16

FILE_MAGIC = b"MCEF"
FILE_VERSION = 1
SALT_BYTES = 16
HEADER_BYTES = len(FILE_MAGIC) + 1 + KEY_ID_BYTES + SALT_BYTES
CHUNK_BYTES = 64 * 1024
SEALED_CHUNK_BYTES = CHUNK_BYTES + TAG_BYTES

GMAIL_DOMAINS = ("gmail.com", "googlemail.com")


class DecryptionError(Exception):
    """A value or file failed to decrypt: it was changed, truncated, or is not ours."""


class UnknownKeyError(DecryptionError):
    """A value or file is under a key that MEDCOR_ENCRYPTION_KEYS no longer holds."""


# --- keys ---------------------------------------------------------------------------------


def parse_key(text, setting="MEDCOR_ENCRYPTION_KEYS"):
    """Decode one Fernet-format key to its 32 bytes, or fail naming the setting (never the key)."""
    if not is_key(text):
        raise ImproperlyConfigured(
            f"{setting} holds a key that is not 32 bytes in url-safe base64; {KEY_HOWTO}"
        )
    return base64.urlsafe_b64decode(text.strip().encode("ascii"))


def _derive(secret, purpose, salt=None):
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=purpose).derive(secret)


class Key:
    """One configured key: its id and the AES-GCM ciphers derived from it."""

    def __init__(self, secret):
        self.id = hmac.new(secret, b"medcor key id", hashlib.sha256).digest()[:KEY_ID_BYTES]
        self.text_cipher = AESGCM(_derive(secret, b"medcor text v1"))
        self._secret = secret

    def file_cipher(self, salt):
        """Return the cipher of one file, derived from this key and the file's salt."""
        return AESGCM(_derive(self._secret, b"medcor file v1", salt))


class Keyring:
    """The configured keys in order: the first encrypts, any of them decrypts."""

    def __init__(self, secrets):
        if not secrets:
            raise ImproperlyConfigured("MEDCOR_ENCRYPTION_KEYS is empty: at least one key is needed.")
        self.keys = [Key(secret) for secret in secrets]
        self._index = {}
        for position, key in enumerate(self.keys):
            if key.id in self._index:
                raise ImproperlyConfigured(f"MEDCOR_ENCRYPTION_KEYS lists key {position + 1} twice.")
            self._index[key.id] = position

    @property
    def primary(self):
        return self.keys[0]

    def position(self, key_id):
        """Return the position of the key with this id, or None when it is not configured."""
        return self._index.get(key_id)

    def find(self, key_id):
        """Return the key with this id, or raise UnknownKeyError."""
        position = self.position(key_id)
        if position is None:
            raise UnknownKeyError(
                f"encrypted under an unknown key (id {key_id.hex()}): not in MEDCOR_ENCRYPTION_KEYS"
            )
        return self.keys[position]


@lru_cache(maxsize=4)
def _keyring(keys):
    return Keyring([parse_key(key) for key in keys])


def keyring():
    """Return the keyring of the current MEDCOR_ENCRYPTION_KEYS (built once per distinct value)."""
    return _keyring(tuple(key for key in conf.encryption_keys() if key.strip()))


@lru_cache(maxsize=4)
def _index_secret(text):
    if not text:
        raise ImproperlyConfigured("MEDCOR_INDEX_KEY is required to index addresses.")
    return parse_key(text, setting="MEDCOR_INDEX_KEY")


# --- text values --------------------------------------------------------------------------


def is_encrypted(value):
    """Tell whether a stored string has the form of an encrypted value."""
    return isinstance(value, str) and value.startswith(TEXT_PREFIX)


def encrypt_text(text, ring=None):
    """Encrypt a string under the first key (of `ring`, by default the configured keyring); the
    result is ASCII and differs on every call."""
    key = (ring or keyring()).primary
    nonce = os.urandom(NONCE_BYTES)
    sealed = key.text_cipher.encrypt(nonce, text.encode("utf-8"), _text_aad(key.id))
    return TEXT_PREFIX + base64.urlsafe_b64encode(key.id + nonce + sealed).decode("ascii")


def decrypt_text(value):
    """Return the string an encrypted value holds, or raise DecryptionError saying what is wrong."""
    key_id, nonce, sealed = _split_text(value)
    key = keyring().find(key_id)
    try:
        plaintext = key.text_cipher.decrypt(nonce, sealed, _text_aad(key_id))
    except InvalidTag:
        raise DecryptionError("encrypted value failed authentication: it was changed or is corrupt") from None
    return plaintext.decode("utf-8")


def key_index(value):
    """Return the position in MEDCOR_ENCRYPTION_KEYS of the key a value is under, None if unknown."""
    key_id, _, _ = _split_text(value)
    return keyring().position(key_id)


def _split_text(value):
    if not is_encrypted(value):
        raise DecryptionError("not an encrypted value (no enc1: prefix)")
    try:
        raw = base64.b64decode(value[len(TEXT_PREFIX) :].encode("ascii"), altchars=b"-_", validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise DecryptionError("encrypted value is not valid base64: it was changed or cut") from None
    if len(raw) < KEY_ID_BYTES + NONCE_BYTES + TAG_BYTES:
        raise DecryptionError("encrypted value is too short: it was cut")
    return (
        raw[:KEY_ID_BYTES],
        raw[KEY_ID_BYTES : KEY_ID_BYTES + NONCE_BYTES],
        raw[KEY_ID_BYTES + NONCE_BYTES :],
    )


def _text_aad(key_id):
    return TEXT_PREFIX.encode("ascii") + key_id


# --- the address index --------------------------------------------------------------------


def normalise_address(email):
    """Return the mailbox an address reaches: lower-case, no +tag, and no dots for Gmail."""
    address = email.strip().lower()
    local, at, domain = address.rpartition("@")
    if not at or not local:
        return address
    domain = domain.rstrip(".")
    # A leading "+" is the whole local part, not a tag.
    local = local[0] + local[1:].split("+", 1)[0]
    if domain in GMAIL_DOMAINS:
        # Gmail ignores dots in the local part, and googlemail.com is the same mailbox.
        local, domain = local.replace(".", "") or local, GMAIL_DOMAINS[0]
    return f"{local}@{domain}"


def address_index(email, index_key=None):
    """Return the keyed hash (HMAC-SHA256 under MEDCOR_INDEX_KEY, or `index_key`, hex) of the
    normalised address."""
    secret = _index_secret(index_key or conf.index_key())
    return hmac.new(secret, normalise_address(email).encode("utf-8"), hashlib.sha256).hexdigest()


def domain_index(email, index_key=None):
    """Return the keyed hash (as address_index) of the domain an address's mailbox is at."""
    secret = _index_secret(index_key or conf.index_key())
    domain = normalise_address(email).rpartition("@")[2]
    return hmac.new(secret, b"domain:" + domain.encode("utf-8"), hashlib.sha256).hexdigest()


# --- files --------------------------------------------------------------------------------


def plaintext_size(stored_size):
    """Return the plaintext size of a sealed file from its stored size, or raise DecryptionError."""
    body = stored_size - HEADER_BYTES
    if body < TAG_BYTES:
        raise DecryptionError("encrypted file is truncated: shorter than its header and one chunk")
    chunks = -(-body // SEALED_CHUNK_BYTES)
    # A last chunk holds at least its tag; a remainder of fewer bytes means the file was cut.
    if body - (chunks - 1) * SEALED_CHUNK_BYTES < TAG_BYTES:
        raise DecryptionError("encrypted file is truncated inside a chunk")
    return body - chunks * TAG_BYTES


def file_key_index(header):
    """Return the position of the key a sealed file's header names, None if the key is unknown."""
    key_id, _ = _parse_header(header)
    return keyring().position(key_id)


def _parse_header(header):
    if len(header) < HEADER_BYTES or not header.startswith(FILE_MAGIC):
        raise DecryptionError("not an encrypted file (no MCEF header)")
    version = header[len(FILE_MAGIC)]
    if version != FILE_VERSION:
        raise DecryptionError(f"encrypted file of unsupported version {version}")
    start = len(FILE_MAGIC) + 1
    return header[start : start + KEY_ID_BYTES], header[start + KEY_ID_BYTES : HEADER_BYTES]


def _chunk_nonce(index):
    return struct.pack(">QI", index, 0)


def _chunk_aad(header, index, final):
    return header + struct.pack(">QB", index, final)


def _read_exact(handle, size):
    """Read `size` bytes, or fewer only at the end: storages may return short reads."""
    parts, wanted = [], size
    while wanted:
        data = handle.read(wanted)
        if not data:
            break
        parts.append(data)
        wanted -= len(data)
    return b"".join(parts)


def encrypted_chunks(source):
    """Yield a file's sealed form, header first, reading the plaintext one chunk at a time."""
    key = keyring().primary
    salt = os.urandom(SALT_BYTES)
    header = FILE_MAGIC + bytes([FILE_VERSION]) + key.id + salt
    cipher = key.file_cipher(salt)
    if getattr(source, "seekable", lambda: False)():
        source.seek(0)
    yield header
    # One chunk of look-ahead tells the last chunk from the others without knowing the size.
    chunk, index = _read_exact(source, CHUNK_BYTES), 0
    while True:
        following = _read_exact(source, CHUNK_BYTES) if len(chunk) == CHUNK_BYTES else b""
        final = not following
        yield cipher.encrypt(_chunk_nonce(index), chunk, _chunk_aad(header, index, final))
        if final:
            return
        chunk, index = following, index + 1


class EncryptingReader(io.RawIOBase):
    """A read-only file whose bytes are the sealed form of another file, made as they are read."""

    def __init__(self, source):
        super().__init__()
        self._pieces = encrypted_chunks(source)
        self._pending = b""

    def readable(self):
        return True

    def read(self, size=-1):
        parts, held = [self._pending], len(self._pending)
        while size is None or size < 0 or held < size:
            piece = next(self._pieces, None)
            if piece is None:
                break
            parts.append(piece)
            held += len(piece)
        data = b"".join(parts)
        if size is None or size < 0:
            size = len(data)
        self._pending = data[size:]
        return data[:size]

    def readinto(self, buffer):
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class DecryptingReader(io.RawIOBase):
    """A read-only, seekable-if-its-source-is file of the plaintext of a sealed file.

    Holds one decrypted chunk at a time. Every chunk is authenticated before any of its bytes
    are returned, so a changed byte raises DecryptionError instead of yielding garbage.
    """

    def __init__(self, raw, stored_size):
        super().__init__()
        self._raw = raw
        self._header = _read_exact(raw, HEADER_BYTES)
        key_id, salt = _parse_header(self._header)
        self._cipher = keyring().find(key_id).file_cipher(salt)
        self.size = plaintext_size(stored_size)
        self._body = stored_size - HEADER_BYTES
        self._last = -(-self._body // SEALED_CHUNK_BYTES) - 1
        self._position = 0
        self._chunk, self._chunk_index = b"", None
        self._raw_next = 0  # the chunk the source is positioned at
        if self.size == 0:
            self._load(0)  # an empty file is still one sealed chunk: check it

    def readable(self):
        return True

    def seekable(self):
        return self._raw.seekable()

    def tell(self):
        return self._position

    def seek(self, offset, whence=io.SEEK_SET):
        if not self.seekable():
            raise io.UnsupportedOperation("the underlying file is not seekable")
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def read(self, size=-1):
        if size is None or size < 0:
            size = max(0, self.size - self._position)
        parts = []
        while size > 0 and self._position < self.size:
            index, offset = divmod(self._position, CHUNK_BYTES)
            if self._chunk_index != index:
                self._chunk, self._chunk_index = self._load(index), index
            piece = self._chunk[offset : offset + size]
            parts.append(piece)
            self._position += len(piece)
            size -= len(piece)
        return b"".join(parts)

    def readinto(self, buffer):
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self):
        if not self.closed:
            self._raw.close()
        super().close()

    def _load(self, index):
        if index != self._raw_next:
            self._raw.seek(HEADER_BYTES + index * SEALED_CHUNK_BYTES)
        final = index == self._last
        expected = self._body - index * SEALED_CHUNK_BYTES if final else SEALED_CHUNK_BYTES
        sealed = _read_exact(self._raw, expected)
        self._raw_next = index + 1
        if len(sealed) != expected:
            raise DecryptionError(f"encrypted file is truncated: chunk {index} is short")
        try:
            return self._cipher.decrypt(_chunk_nonce(index), sealed, _chunk_aad(self._header, index, final))
        except InvalidTag:
            raise DecryptionError(
                f"encrypted file failed authentication at chunk {index}: it was changed, reordered or cut"
            ) from None
