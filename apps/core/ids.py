"""Public ids: opaque, prefixed (`file-…`, `ftjob-…`), never a sequential integer a caller could walk."""

import secrets
import string

_ALPHABET = string.ascii_letters + string.digits
_RANDOM_LENGTH = 24  # 62**24 ≈ 1e43: unguessable and collision-free in practice


def new_public_id(prefix: str) -> str:
    return f"{prefix}-" + "".join(secrets.choice(_ALPHABET) for _ in range(_RANDOM_LENGTH))
