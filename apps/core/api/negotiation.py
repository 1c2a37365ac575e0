from rest_framework.negotiation import BaseContentNegotiation


class AlwaysJsonNegotiation(BaseContentNegotiation):
    """The API answers JSON (or raw bytes for file content) whatever `Accept` says, as OpenAI's API does: the SDK
    sends `Accept: application/binary` for downloads, which must not turn into a 406."""

    def select_parser(self, request, parsers):
        for parser in parsers:
            if parser.media_type.split(";")[0] == (request.content_type or "").split(";")[0].strip():
                return parser
        return None

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type
