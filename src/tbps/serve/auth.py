"""The token check: with a token set, a request is accepted when it carries it.

Three ways to send it: ``Authorization: Bearer TOKEN``, ``?token=TOKEN``, or the
``tbps_token`` cookie. Opening the page as ``/?token=TOKEN`` sets that cookie (HttpOnly,
SameSite=Strict; see ``routes.page``), so the page's own requests and ``<img>`` tags
authenticate without the token ever appearing in image URLs. Tokens are compared with
``hmac.compare_digest``. The token is read from ``app.state.token``.

(No ``from __future__ import annotations``: FastAPI reads these annotations at runtime.)
"""

import hmac
import logging
import re
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyCookie, APIKeyQuery, HTTPAuthorizationCredentials, HTTPBearer

from tbps.serve.schemas import ERROR

TOKEN_COOKIE = "tbps_token"

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer TOKEN`")
_query_key = APIKeyQuery(name="token", auto_error=False, description="`?token=TOKEN` (for links and <img>)")
_cookie_key = APIKeyCookie(name=TOKEN_COOKIE, auto_error=False, description="Set by opening `/?token=TOKEN`.")


def token_matches(candidate: str | None, token: str | None) -> bool:
    """Whether ``candidate`` is ``token``, compared in constant time (False without a token)."""
    if candidate is None or not token:
        return False
    return hmac.compare_digest(candidate.encode("utf-8"), token.encode("utf-8"))


def require_token(
    request: Request,
    cred: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    q: Annotated[str | None, Depends(_query_key)],
    c: Annotated[str | None, Depends(_cookie_key)],
) -> None:
    """The dependency guarding a route: a 401 unless one offered credential is the token."""
    # Check every offered credential: a stale cookie must not hide a good header.
    offered = [x for x in (cred.credentials if cred else None, q, c) if x is not None]
    if any(token_matches(x, request.app.state.token) for x in offered):
        return
    detail = "wrong token" if offered else (
        "this server needs a token: send 'Authorization: Bearer TOKEN' or add ?token=TOKEN"
    )
    raise HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})


def token_dependencies(token: str | None) -> list:
    """The dependencies every guarded route gets: the token check, or none without a token."""
    return [Depends(require_token)] if token else []


def auth_responses(token: str | None) -> dict:
    """The 401 answer the schema documents on guarded routes (none without a token)."""
    return {401: {**ERROR, "description": "Missing or wrong token."}} if token else {}


_TOKEN_IN_QUERY = re.compile(r"([?&]token=)[^&#\s\"]*", re.IGNORECASE)


def redact_token(text: str) -> str:
    """``text`` with the value of every ``token=`` query parameter replaced by ``***``."""
    return _TOKEN_IN_QUERY.sub(r"\1***", text)


class RedactToken(logging.Filter):
    """A logging filter that keeps ``?token=...`` out of the access log (uvicorn logs each
    request's full path and query as an argument of its record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact_token(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.msg, str):
            record.msg = redact_token(record.msg)
        return True


def access_log_config() -> dict:
    """uvicorn's logging configuration with ``RedactToken`` on its access logger: pass it as
    ``uvicorn.run(..., log_config=access_log_config())`` (``tbps serve`` does)."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["tbps_redact_token"] = {"()": "tbps.serve.auth.RedactToken"}
    access = config["loggers"].setdefault("uvicorn.access", {})
    access["filters"] = [*access.get("filters", []), "tbps_redact_token"]
    return config
