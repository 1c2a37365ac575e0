"""OpenAI-style cursor lists: `{"object": "list", "data": [...], "has_more", "first_id", "last_id"}`."""

from collections.abc import Callable

from django.db.models import QuerySet

from .errors import ApiError

MAX_PAGE_SIZE = 100


def parse_limit(raw: str | None, *, default: int = 20) -> int:
    if raw in (None, ""):
        return default
    try:
        limit = int(raw)
    except ValueError:
        raise ApiError("limit must be a whole number.", param="limit") from None
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise ApiError(f"limit must be between 1 and {MAX_PAGE_SIZE}.", param="limit")
    return limit


def cursor_page(queryset: QuerySet, *, query_params, to_json: Callable, newest_first: bool = True) -> dict:
    """Pages over `queryset` by primary key; `after` is the public id of the last object of the previous page."""
    limit = parse_limit(query_params.get("limit"))
    order = query_params.get("order", "desc" if newest_first else "asc")
    if order not in ("asc", "desc"):
        raise ApiError("order must be 'asc' or 'desc'.", param="order")
    queryset = queryset.order_by("-id" if order == "desc" else "id")
    after = query_params.get("after")
    if after:
        anchor = queryset.filter(public_id=after).values_list("id", flat=True).first()
        if anchor is None:
            raise ApiError(f"No object with id '{after}' in this list.", param="after", status_code=404)
        queryset = queryset.filter(id__lt=anchor) if order == "desc" else queryset.filter(id__gt=anchor)
    return list_page(list(queryset[: limit + 1]), limit=limit, to_json=to_json)


def list_page(rows: list, *, limit: int, to_json: Callable) -> dict:
    """OpenAI's list envelope for up to ``limit`` rows, given one row more when there is a next page."""
    data = [to_json(row) for row in rows[:limit]]
    return {
        "object": "list",
        "data": data,
        "has_more": len(rows) > limit,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }
