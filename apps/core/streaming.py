"""Streaming a stored object to the client in chunks, under WSGI and ASGI alike, never whole in memory."""

from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIRequest
from django.http import StreamingHttpResponse
from django.utils.http import content_disposition_header

CHUNK_BYTES = 1024 * 1024


def _sync_chunks(stream):
    with stream:
        yield from iter(lambda: stream.read(CHUNK_BYTES), b"")


async def _async_chunks(stream):
    # Django's ASGI handler would buffer a synchronous iterator completely before sending it; reading each chunk in
    # a thread keeps memory flat for large files.
    read = sync_to_async(stream.read, thread_sensitive=False)
    try:
        while chunk := await read(CHUNK_BYTES):
            yield chunk
    finally:
        await sync_to_async(stream.close, thread_sensitive=False)()


def stream_download(request, stream, *, size: int, filename: str) -> StreamingHttpResponse:
    django_request = getattr(request, "_request", request)
    chunks = _async_chunks(stream) if isinstance(django_request, ASGIRequest) else _sync_chunks(stream)
    response = StreamingHttpResponse(chunks, content_type="application/octet-stream")
    response["Content-Length"] = str(size)
    response["Content-Disposition"] = content_disposition_header(as_attachment=True, filename=filename)
    return response
