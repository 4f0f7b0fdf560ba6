"""Keyed pseudonyms: HMAC-SHA256 under a secret key kept in a file outside the output.

What it owns: `PseudonymKey` (load a key file, or create one on first use) and the two things
de-identification derives from it: patient pseudonyms (`key.pseudonym(patient_id)`) and
replacement UIDs (`key.uid(uid)`, under the 2.25 root).

Why keyed: a plain or salt-less hash of a short patient ID is reversed by enumerating every
possible ID (seconds for 8 digits); an HMAC cannot be recomputed without the key. The same key
maps the same patient to the same pseudonym across runs (longitudinal linking); another key gives
unrelated pseudonyms, so two releases made with different keys cannot be joined.

Where the key lives: `--key-file PATH`, else `$LLAVA_ULTRA_KEY_FILE`, else
`$XDG_CONFIG_HOME/llava-ultra/deid.key` (`~/.config/llava-ultra/deid.key`). A missing file is
created with 32 random bytes (hex, mode 0600) and the command says where; an empty or short key is
refused, never used. Keep the file secret and out of every data release; lose it and the
pseudonyms can no longer be linked to new data.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError

KEY_ENV = "LLAVA_ULTRA_KEY_FILE"
MIN_KEY_BYTES = 16


def default_key_path() -> Path:
    """`$LLAVA_ULTRA_KEY_FILE`, else `$XDG_CONFIG_HOME/llava-ultra/deid.key` (~/.config/...)."""
    env = os.environ.get(KEY_ENV)
    if env:
        return Path(env).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "llava-ultra" / "deid.key"


@dataclass(frozen=True)
class PseudonymKey:
    """A secret HMAC key. `created` is True when this run made the key file."""

    secret: bytes = field(repr=False)
    path: Path | None = None
    created: bool = False

    def __post_init__(self) -> None:
        if len(self.secret) < MIN_KEY_BYTES:
            where = f"key file {self.path}" if self.path else "the key"
            raise DataError(
                f"{where} holds {len(self.secret)} byte(s); a pseudonym key needs at least "
                f"{MIN_KEY_BYTES} (an empty or short key would make pseudonyms reversible). Delete "
                "the file to have a new random key created, or pass --key-file with a real key"
            )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PseudonymKey:
        """Read a key file (hex text, or raw bytes); DataError when missing, empty or short."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"key file {path} does not exist; pass an existing --key-file, or leave it out")
        try:
            raw = path.read_bytes().strip()
        except OSError as exc:
            raise DataError(f"key file {path} cannot be read ({exc.strerror}); fix its permissions") from None
        try:
            secret = bytes.fromhex(raw.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            secret = raw
        return cls(secret, path)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str] | None = None) -> PseudonymKey:
        """Load the key at `path` (default: `default_key_path()`), creating it if it is missing."""
        path = Path(path) if path is not None else default_key_path()
        if path.exists():
            return cls.load(path)
        secret = secrets.token_bytes(32)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(secret.hex() + "\n")
        except OSError as exc:
            raise DataError(
                f"cannot create the pseudonym key file {path} ({exc.strerror}); pass --key-file with a "
                "writable path outside the output folder"
            ) from None
        return cls(secret, path, created=True)

    def digest(self, value: str, purpose: str) -> bytes:
        """HMAC-SHA256 of `value`, domain-separated by `purpose` (patient IDs and UIDs differ)."""
        return hmac.new(self.secret, f"{purpose}\x00{value}".encode(), hashlib.sha256).digest()

    def pseudonym(self, value: str, prefix: str = "ANON-") -> str:
        """Stable pseudonym of a patient ID: prefix + 16 hex digits (64 bits) of the HMAC."""
        return prefix + self.digest(value, "patient").hex()[:16]

    def uid(self, uid: str) -> str:
        """Replacement UID: 2.25.<128-bit integer of the HMAC of the original UID>."""
        return "2.25." + str(int.from_bytes(self.digest(uid, "uid")[:16], "big"))
