"""Encryption keys: the key object, the keys derived from it, and key files.

One random 256-bit master key per store. Nothing uses it directly: HKDF-SHA256
derives a separate key per purpose (distinct ``info`` labels), so that a chunk id
never doubles as a cipher key or a signature:

* ``cipher_key``  AES-256-GCM key of every blob,
* ``id_key``      HMAC-SHA256 key of chunk digests (chunk names reveal nothing),
* ``signing_key`` HMAC-SHA256 key of snapshot manifests,
* ``check_key``   HMAC-SHA256 key of the store config's key check value.

The key file (JSON, mode 0600, never overwritten; ``key change-passphrase``
replaces it atomically, same key) holds the master key either in the clear
(``kdf: none``) or wrapped with AES-256-GCM under a key derived from a
passphrase with scrypt. Its ``fingerprint`` is derived from the key (HKDF, own
label) and safe to show; the key and the passphrase never appear in a repr, a
log line or an exception message.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hmac
import json
import os
import re
import secrets
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from pvebackup.api.errors import (
    KeyFileError,
    LockedError,
    MissingKeyError,
    PveBackupError,
    WrongKeyError,
)
from pvebackup.kit import safefs
from pvebackup.kit.secretfile import read_secret_file
from pvebackup.store.formats import (
    FORMAT_VERSION,
    KDF_SALT,
    KEY_FILE_FORMAT,
    KEY_FILE_WRAP_AAD,
    LABEL_BLOB_CIPHER,
    LABEL_CHUNK_ID,
    LABEL_KEY_CHECK,
    LABEL_KEY_FINGERPRINT,
    LABEL_MANIFEST_SIGNATURE,
)

__all__ = [
    "KEY_SIZE",
    "PAPERKEY_BEGIN",
    "PAPERKEY_END",
    "EncryptionKey",
    "KeyFileInfo",
    "PassphraseProvider",
    "change_key_passphrase",
    "create_key_file",
    "import_paperkey",
    "key_file_info",
    "load_key_file",
    "paperkey_text",
    "write_key_file",
]

KEY_SIZE: Final = 32
PassphraseProvider = Callable[[], str]


# scrypt cost: n=2**15, r=8 is ~32 MiB and ~0.1 s here. Limits for reading a file
# bound what a malformed key file can make us spend.
DEFAULT_SCRYPT_N: Final = 2**15
_SCRYPT_MAX_N: Final = 2**20
_SCRYPT_SALT_SIZE: Final = 16


def _derive(material: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=KDF_SALT, info=label).derive(material)


class EncryptionKey:
    """A store's 256-bit master key and the keys derived from it.

    ``repr()`` and ``str()`` show only the fingerprint. Instances are immutable and
    safe to share between threads.
    """

    __slots__ = ("_material", "_cipher", "_id", "_sign", "_check", "_fingerprint")

    def __init__(self, material: bytes) -> None:
        if len(material) != KEY_SIZE:
            raise KeyFileError(f"an encryption key has {KEY_SIZE} bytes")
        self._material = bytes(material)
        self._cipher = _derive(material, LABEL_BLOB_CIPHER)
        self._id = _derive(material, LABEL_CHUNK_ID)
        self._sign = _derive(material, LABEL_MANIFEST_SIGNATURE)
        self._check = _derive(material, LABEL_KEY_CHECK)
        fp = _derive(material, LABEL_KEY_FINGERPRINT)[:8]
        self._fingerprint = ":".join(f"{b:02x}" for b in fp)

    @classmethod
    def generate(cls) -> EncryptionKey:
        """A new random key from the OS's CSPRNG."""
        return cls(secrets.token_bytes(KEY_SIZE))

    @property
    def fingerprint(self) -> str:
        """``aa:bb:...`` (8 bytes, derived): identifies the key, reveals nothing of it."""
        return self._fingerprint

    @property
    def material(self) -> bytes:
        """The raw master key. Only for writing a key file."""
        return self._material

    @property
    def cipher_key(self) -> bytes:
        return self._cipher

    @property
    def id_key(self) -> bytes:
        return self._id

    @property
    def signing_key(self) -> bytes:
        return self._sign

    def check_value(self, store_id: str) -> str:
        """The key check value stored in a store's config (hex HMAC of the store id)."""
        return hmac.digest(self._check, b"store " + store_id.encode(), "sha256").hex()

    def __repr__(self) -> str:
        return f"EncryptionKey(fingerprint={self._fingerprint!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EncryptionKey):
            return NotImplemented
        return hmac.compare_digest(self._material, other._material)

    def __hash__(self) -> int:
        return hash(self._fingerprint)

    def __reduce__(self) -> Any:
        # Pickling would write the key into whatever the pickle goes to.
        raise TypeError("EncryptionKey cannot be pickled")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, what: str, path: Path) -> bytes:
    if not isinstance(value, str):
        raise KeyFileError(f"{path}: {what} is not a string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyFileError(f"{path}: {what} is not base64") from exc


def _scrypt_key(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    secret = unicodedata.normalize("NFC", passphrase).encode("utf-8")
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(secret)


def _created_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _key_doc(
    key: EncryptionKey, passphrase: str | None, scrypt_n: int, created: str
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "format": KEY_FILE_FORMAT,
        "version": FORMAT_VERSION,
        "created": created,
        "fingerprint": key.fingerprint,
    }
    if passphrase is None:
        doc["kdf"] = {"name": "none"}
        doc["key"] = _b64(key.material)
    else:
        if not passphrase:
            raise KeyFileError("the passphrase is empty")
        # A fresh salt and nonce on every wrap, also when the passphrase is
        # changed: the same wrap key never seals twice.
        salt = secrets.token_bytes(_SCRYPT_SALT_SIZE)
        r, p = 8, 1
        wrap = _scrypt_key(passphrase, salt, scrypt_n, r, p)
        nonce = secrets.token_bytes(12)
        sealed = AESGCM(wrap).encrypt(nonce, key.material, KEY_FILE_WRAP_AAD)
        doc["kdf"] = {"name": "scrypt", "n": scrypt_n, "r": r, "p": p, "salt": _b64(salt)}
        doc["key"] = _b64(nonce + sealed)
    return doc


def _serialize(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("ascii")


def _publish_new(target: Path, data: bytes) -> None:
    try:
        # link(2) publishes the complete file or nothing, and never over an
        # existing name (a symlink counts): a key file is never overwritten.
        written = safefs.atomic_write_path(target, data, mode=0o600, overwrite=False)
    except OSError as exc:
        raise KeyFileError(f"{target}: cannot write: {exc.strerror or exc}") from exc
    if not written:
        raise KeyFileError(f"{target}: exists, refusing to overwrite a key file")


def write_key_file(
    path: str | os.PathLike[str],
    key: EncryptionKey,
    passphrase: str | None,
    *,
    scrypt_n: int = DEFAULT_SCRYPT_N,
) -> None:
    """Write ``key`` to a new file ``path`` (mode 0600), wrapped when ``passphrase``.

    Refuses to overwrite an existing file (``KeyFileError``); the file appears
    fully written or not at all from the point of view of a later ``load``.
    """
    _publish_new(Path(path), _serialize(_key_doc(key, passphrase, scrypt_n, _created_now())))


def create_key_file(
    path: str | os.PathLike[str],
    passphrase: str | None,
    *,
    scrypt_n: int = DEFAULT_SCRYPT_N,
) -> EncryptionKey:
    """Generate a random key, write it to the new file ``path`` and return it."""
    key = EncryptionKey.generate()
    write_key_file(path, key, passphrase, scrypt_n=scrypt_n)
    return key


_FINGERPRINT: Final = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){7}")


def _int_param(kdf: dict[str, Any], name: str, lo: int, hi: int, path: Path) -> int:
    value = kdf.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise KeyFileError(f"{path}: scrypt parameter {name} missing or out of range")
    return value


@dataclass(frozen=True, slots=True)
class KeyFileInfo:
    """What ``key show`` tells about a key file: never the key.

    ``fingerprint`` is the one recorded in the file; it is checked against the
    key whenever the key is unlocked (and here already when ``kdf`` is
    ``none``: ``verified``).
    """

    path: str
    fingerprint: str
    created: str
    kdf: str
    kdf_params: dict[str, int]
    verified: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "fingerprint": self.fingerprint,
            "created": self.created,
            "kdf": self.kdf,
            "kdf-params": dict(self.kdf_params),
            "verified": self.verified,
        }


def _parse_doc(raw: bytes, src: Path) -> dict[str, Any]:
    """The checked JSON of a key file (shape only; the key is not unwrapped)."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise KeyFileError(f"{src}: not a key file (no valid JSON)") from exc
    if not isinstance(doc, dict) or doc.get("format") != KEY_FILE_FORMAT:
        raise KeyFileError(f"{src}: not a pvebackup key file")
    if doc.get("version") != FORMAT_VERSION:
        raise KeyFileError(f"{src}: unsupported key file version {doc.get('version')!r}")
    if not isinstance(doc.get("kdf"), dict):
        raise KeyFileError(f"{src}: kdf missing")
    fingerprint = doc.get("fingerprint")
    if not isinstance(fingerprint, str) or not _FINGERPRINT.fullmatch(fingerprint):
        raise KeyFileError(f"{src}: fingerprint missing or malformed")
    created = doc.get("created")
    if not isinstance(created, str) or len(created) > 64 or not created.isprintable():
        # Shown by key show and printed on paper: no control characters.
        raise KeyFileError(f"{src}: creation time missing or malformed")
    if doc["kdf"].get("name") not in ("none", "scrypt"):
        raise KeyFileError(f"{src}: unknown kdf {doc['kdf'].get('name')!r}")
    return doc


def _scrypt_params(kdf: dict[str, Any], src: Path) -> tuple[int, int, int]:
    n = _int_param(kdf, "n", 2, _SCRYPT_MAX_N, src)
    r = _int_param(kdf, "r", 1, 32, src)
    p = _int_param(kdf, "p", 1, 16, src)
    # A malformed key file must not make us spend unbounded memory or time.
    if n & (n - 1) or 128 * n * r * p > 1 << 30:
        raise KeyFileError(f"{src}: scrypt parameters out of range")
    return n, r, p


def _unwrap(
    doc: dict[str, Any], src: Path, passphrase_provider: PassphraseProvider | None
) -> EncryptionKey:
    kdf = doc["kdf"]
    blob = _unb64(doc.get("key"), "key", src)
    if kdf["name"] == "none":
        material = blob
    else:
        n, r, p = _scrypt_params(kdf, src)
        salt = _unb64(kdf.get("salt"), "salt", src)
        if len(blob) != 12 + KEY_SIZE + 16:
            raise KeyFileError(f"{src}: wrapped key has the wrong length")
        if passphrase_provider is None:
            raise MissingKeyError(f"{src}: the key is protected by a passphrase; none given")
        wrap = _scrypt_key(passphrase_provider(), salt, n, r, p)
        try:
            material = AESGCM(wrap).decrypt(blob[:12], blob[12:], KEY_FILE_WRAP_AAD)
        except InvalidTag as exc:
            raise WrongKeyError(f"{src}: wrong passphrase") from exc
    if len(material) != KEY_SIZE:
        raise KeyFileError(f"{src}: the key has the wrong length")
    key = EncryptionKey(material)
    if doc.get("fingerprint") != key.fingerprint:
        raise KeyFileError(f"{src}: the fingerprint does not match the key (damaged file)")
    return key


def load_key_file(
    path: str | os.PathLike[str],
    passphrase_provider: PassphraseProvider | None = None,
) -> EncryptionKey:
    """Read a key file. ``passphrase_provider`` is called only if the file needs it.

    Raises ``UnprotectedKeyFileError`` (group or others may access it, as OpenSSH
    refuses such keys), ``KeyFileError`` (unreadable or malformed),
    ``MissingKeyError`` (needs a passphrase, no provider), ``WrongKeyError`` (the
    passphrase does not fit).
    """
    src = Path(path)
    return _unwrap(_parse_doc(read_secret_file(src, "key file"), src), src, passphrase_provider)


def key_file_info(path: str | os.PathLike[str]) -> KeyFileInfo:
    """Fingerprint, creation time and kdf of a key file, without its passphrase.

    The same refusals as :func:`load_key_file` (mode, shape); a plain key is
    also checked against its fingerprint.
    """
    src = Path(path)
    doc = _parse_doc(read_secret_file(src, "key file"), src)
    kdf = doc["kdf"]
    params: dict[str, int] = {}
    if kdf["name"] == "scrypt":
        n, r, p = _scrypt_params(kdf, src)
        params = {"n": n, "r": r, "p": p}
    else:
        _unwrap(doc, src, None)
    return KeyFileInfo(
        path=str(src),
        fingerprint=doc["fingerprint"],
        created=doc["created"],
        kdf=kdf["name"],
        kdf_params=params,
        verified=kdf["name"] == "none",
    )


def change_key_passphrase(
    path: str | os.PathLike[str],
    passphrase_provider: PassphraseProvider | None,
    new_passphrase: str | None,
    *,
    scrypt_n: int = DEFAULT_SCRYPT_N,
) -> EncryptionKey:
    """Re-wrap the key of ``path`` under ``new_passphrase`` (None: store it plain).

    The key, its fingerprint and creation time stay; the file is replaced all
    at once (the atomic writer's rename: a crash leaves the old file or the new
    one, both usable), mode 0600. A symlinked key file is rewritten at its
    target, the link stays.

    Exclusive: the file is locked (``flock``) from reading to publishing, and
    the name must still be the file that was read and locked; a concurrent
    change (a second ``change-passphrase``, an edit) is refused rather than
    lost, so that no one is left with a passphrase that no longer opens it.
    """
    src = Path(path)
    real = Path(os.path.realpath(src))
    try:
        fd = safefs.open_file_path(real, follow_symlinks=False)
    except OSError as exc:
        raise KeyFileError(f"{src}: cannot open key file: {exc.strerror or exc}") from exc
    except PveBackupError as exc:
        raise KeyFileError(f"{src}: the key file is not a regular file") from exc
    with safefs.owned_fd(fd):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise LockedError(f"{src}: another process is changing this key file") from exc
        raw = read_secret_file(real, "key file")
        _check_same_file(fd, real, src)
        doc = _parse_doc(raw, src)
        key = _unwrap(doc, src, passphrase_provider)
        data = _serialize(_key_doc(key, new_passphrase, scrypt_n, doc["created"]))
        _check_same_file(fd, real, src)
        try:
            safefs.atomic_write_path(real, data, mode=0o600, overwrite=True)
        except OSError as exc:
            raise KeyFileError(f"{src}: cannot write: {exc.strerror or exc}") from exc
    return key


def _check_same_file(fd: int, real: Path, src: Path) -> None:
    try:
        now = os.stat(real, follow_symlinks=False)
    except OSError as exc:
        raise KeyFileError(f"{src}: the key file went away: {exc.strerror or exc}") from exc
    held = os.fstat(fd)
    if (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
        raise LockedError(f"{src}: the key file was replaced meanwhile; nothing was changed")


PAPERKEY_BEGIN: Final = "-----BEGIN PVEBACKUP KEY-----"
PAPERKEY_END: Final = "-----END PVEBACKUP KEY-----"


def paperkey_text(path: str | os.PathLike[str]) -> str:
    """The key file ``path`` as text to print on paper (and type in again).

    As PBS's text paper key: a header and the key file itself, one JSON field a
    line, between BEGIN/END lines; no QR code. A protected key stays wrapped:
    the paper alone is useless without the passphrase. The text is the key
    (wrapped or not), so it is only for the operator's eyes and printer.
    """
    info = key_file_info(path)
    src = Path(path)
    doc = _parse_doc(read_secret_file(src, "key file"), src)
    lines = [
        "pvebackup encryption key (paper copy)",
        f"fingerprint: {info.fingerprint}",
        f"created:     {info.created}",
        f"kdf:         {info.kdf}"
        + (" (the passphrase is needed to use it)" if info.kdf != "none" else " (NOT protected)"),
        "restore with: pvebackup key import-paperkey PAPERFILE NEWKEYFILE",
        "",
        PAPERKEY_BEGIN,
        _serialize(doc).decode("ascii").rstrip("\n"),
        PAPERKEY_END,
        "",
    ]
    return "\n".join(lines)


def import_paperkey(
    text: str,
    path: str | os.PathLike[str],
    passphrase_provider: PassphraseProvider | None,
) -> EncryptionKey:
    """Write the key of a paper key ``text`` to the new file ``path`` (0600).

    The key is unwrapped before anything is written (a protected key needs its
    passphrase): a mistyped character fails the fingerprint or the wrap's tag
    here, not at the first restore.
    """
    target = Path(path)
    source = Path("paper key")
    lines = text.splitlines()
    try:
        begin = next(i for i, line in enumerate(lines) if line.strip() == PAPERKEY_BEGIN)
        end = next(i for i in range(begin + 1, len(lines)) if lines[i].strip() == PAPERKEY_END)
    except StopIteration:
        raise KeyFileError(
            f"not a paper key: no '{PAPERKEY_BEGIN}' ... '{PAPERKEY_END}' block"
        ) from None
    body = "\n".join(lines[begin + 1 : end])
    try:
        doc = _parse_doc(body.encode("utf-8"), source)
    except UnicodeEncodeError as exc:
        raise KeyFileError("not a paper key: not text") from exc
    key = _unwrap(doc, source, passphrase_provider)
    _publish_new(target, _serialize(doc))
    return key
