"""Request bodies validated in the handler, with 422s whose message names the field.

FastAPI's own body validation answers unions (an object or an array of them) with
one error per branch; handlers that take such bodies validate them here instead.
The errors keep FastAPI's shape: ``{"detail": [{"type", "loc", "msg"}]}``.
"""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


def invalid(field: str, message: str, loc: tuple = ("body",), kind: str = "value_error") -> RequestValidationError:
    return RequestValidationError([{"type": kind, "loc": loc, "msg": f"{field}: {message}"}])


def validate_item(model: type[M], item: Any, errors: list[dict], index: int | None = None) -> M | None:
    """``item`` as ``model``, or None with its errors appended (``[index].field: message``)."""
    try:
        return model.model_validate(item)
    except ValidationError as exc:
        for e in exc.errors(include_url=False):
            field = ".".join(str(p) for p in e["loc"])
            where = field if index is None else f"[{index}]" + (f".{field}" if field else "")
            loc = ("body", *(() if index is None else (index,)), *e["loc"])
            errors.append({"type": e["type"], "loc": loc, "msg": f"{where or 'body'}: {e['msg']}"})
        return None


def validate_body(model: type[M], payload: Any) -> M:
    errors: list[dict] = []
    parsed = validate_item(model, payload, errors)
    if errors:
        raise RequestValidationError(errors)
    return parsed
