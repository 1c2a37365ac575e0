from django.contrib.auth.models import AnonymousUser
from rest_framework import authentication, exceptions

from .services import api_key_authenticate


class ApiKeyAuthentication(authentication.BaseAuthentication):
    """`Authorization: Bearer <key>`: what the openai SDK sends. The key's tenant becomes the request's tenant."""

    keyword = "bearer"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).decode("latin-1")
        if not header:
            return None
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != self.keyword or not secret.strip():
            raise exceptions.AuthenticationFailed("Send the API key as 'Authorization: Bearer <key>'.")
        api_key = api_key_authenticate(secret=secret.strip())
        if api_key is None:
            raise exceptions.AuthenticationFailed("Incorrect API key provided, or the key was revoked.")
        return (api_key.created_by or AnonymousUser(), api_key)

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="api"'
