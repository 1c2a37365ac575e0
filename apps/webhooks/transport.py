"""Where a webhook may be sent, and the POST itself.

Only http and https, never credentials inside the URL. When the operator sets WEBHOOK_ALLOW_PRIVATE_NETWORKS to
false, a URL whose host resolves to a loopback, private, link-local or otherwise non-public address is refused when
the endpoint is saved, and the address of every connection is checked again before a byte is sent: a DNS answer
that changes after the first check (rebinding) cannot reach the private network either. Redirects are not followed,
for the same reason.
"""

import http.client
import ipaddress
import socket
import ssl
from urllib.parse import urlsplit

from django.conf import settings

MAX_URL_LENGTH = 2048
_ALLOWED_SCHEMES = ("http", "https")


class UnsafeWebhookUrl(ValueError):
    """A URL webhooks may not be sent to; the message is a sentence for the tenant."""


def private_networks_allowed() -> bool:
    return bool(getattr(settings, "WEBHOOK_ALLOW_PRIVATE_NETWORKS", True))


def is_public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 scope (`fe80::1%eth0`) is not part of the address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback, whatever its spelling
    return ip.is_global and not ip.is_multicast


def check_webhook_url(url: str, *, resolve: bool = True) -> None:
    """Raises UnsafeWebhookUrl when webhooks may not go to `url`. With `resolve`, and private networks refused, the
    host's addresses are looked up and each must be public."""
    if not isinstance(url, str) or not url.strip():
        raise UnsafeWebhookUrl("url must be an http or https URL.")
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeWebhookUrl(f"url is longer than {MAX_URL_LENGTH} characters.")
    if any(character.isspace() or ord(character) < 32 for character in url):
        raise UnsafeWebhookUrl("url must not contain spaces or control characters.")
    parts = urlsplit(url)
    if parts.scheme.lower() not in _ALLOWED_SCHEMES:
        raise UnsafeWebhookUrl("url must start with http:// or https://.")
    if parts.username is not None or parts.password is not None:
        raise UnsafeWebhookUrl(
            "url must not carry credentials (user:password@); check the webhook-signature header instead."
        )
    if not parts.hostname:
        raise UnsafeWebhookUrl("url has no host name.")
    try:
        port = parts.port
    except ValueError:
        raise UnsafeWebhookUrl("url has an invalid port.") from None
    if resolve and not private_networks_allowed():
        for address in _addresses_of(parts.hostname, port or _default_port(parts.scheme)):
            if not is_public_address(address):
                raise UnsafeWebhookUrl(
                    f"{parts.hostname} resolves to {address}, a loopback or private address; this server only sends "
                    "webhooks to public addresses."
                )


def _default_port(scheme: str) -> int:
    return 443 if scheme.lower() == "https" else 80


def _addresses_of(hostname: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(hostname, port, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        raise UnsafeWebhookUrl(f"The host {hostname} could not be resolved.") from None
    return sorted({info[4][0] for info in infos})


def _connect_to_allowed_address(address, timeout, source_address):
    """socket.create_connection, then a check of the address actually reached, before TLS or HTTP say anything."""
    sock = socket.create_connection(address, timeout, source_address)
    if not private_networks_allowed():
        peer = sock.getpeername()[0]
        if not is_public_address(peer):
            sock.close()
            raise UnsafeWebhookUrl(f"{address[0]} now resolves to {peer}, a loopback or private address; not sent.")
    return sock


def post_json(url: str, *, body: bytes, headers: dict[str, str], timeout: float) -> int:
    """POSTs `body` and returns the HTTP status. Raises OSError or http.client.HTTPException when no answer came,
    UnsafeWebhookUrl when the URL or the address reached is not allowed."""
    check_webhook_url(url, resolve=False)  # the address is checked on the socket itself, see above
    parts = urlsplit(url)
    connection_class = http.client.HTTPSConnection if parts.scheme.lower() == "https" else http.client.HTTPConnection
    kwargs = {"context": ssl.create_default_context()} if connection_class is http.client.HTTPSConnection else {}
    connection = connection_class(parts.hostname, parts.port, timeout=timeout, **kwargs)
    # http.client opens its socket through this attribute; replacing it is the one seam that sees the address
    # reached before anything is sent.
    connection._create_connection = _connect_to_allowed_address
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request("POST", target, body=body, headers=headers)
        response = connection.getresponse()
        # A receiver owes us nothing but its status; read a little so the connection closes cleanly.
        response.read(4096)
        return response.status
    finally:
        connection.close()
