"""Standard Webhooks signatures, the scheme OpenAI signs its webhooks with (so `client.webhooks.unwrap` verifies ours):
`webhook-signature: v1,<base64 HMAC-SHA256 of "<webhook-id>.<webhook-timestamp>.<body>">`, keyed with the bytes the
`whsec_` secret encodes."""

import base64
import hashlib
import hmac

SECRET_PREFIX = "whsec_"  # noqa: S105 - the marker of the format, not a secret


def _key_of(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def webhook_signature(*, secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key_of(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def signature_headers(*, secret: str, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": webhook_signature(secret=secret, message_id=message_id, timestamp=timestamp, body=body),
    }
