"""The PII engine: Amazon's normalization rules and SHA-256 hashing of member identifiers."""

from syncd.pii.hashing import HashedPII, build_hashed_pii, hash_field
from syncd.pii.normalize import FIELDS, normalize, normalize_country

__all__ = [
    "FIELDS",
    "HashedPII",
    "build_hashed_pii",
    "hash_field",
    "normalize",
    "normalize_country",
]
