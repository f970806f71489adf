"""sha256 of small data without loading OpenSSL.

``hashlib`` loads OpenSSL when it is imported (about 2 ms of CPU), which a cached run and
``hpcexp list`` would pay only to hash a few kilobytes: a recipe, a Dockerfile, an identity
document. The interpreter's own sha256 module gives the same digest without that; large
files still go through ``hashlib`` (:func:`hpcexp.infra.hashing.sha256_file`), whose
OpenSSL code is several times faster per byte.
"""

from __future__ import annotations

try:
    from _sha256 import sha256  # CPython 3.11 and older
except ImportError:  # pragma: no cover - other versions and interpreters
    try:
        from _sha2 import sha256  # type: ignore[no-redef]  # CPython 3.12 and newer
    except ImportError:
        from hashlib import sha256  # type: ignore[assignment]

__all__ = ["sha256", "sha256_hex"]


def sha256_hex(data: bytes) -> str:
    return sha256(data).hexdigest()
