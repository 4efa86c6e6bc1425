"""The console's browser session: a browser cannot send a bearer token with a page load, so
`POST /ui/login` with the server's token sets a cookie that stands for it.

The cookie holds an HMAC of the token, never the token itself, so it grants nothing elsewhere
and changing the token ends every session. It is HttpOnly (page scripts cannot read it) and
SameSite=Strict (other sites' pages cannot make the browser send it), which is what keeps the
cookie-authenticated API and console writes safe from cross-site requests.
"""

from __future__ import annotations

import hashlib
import hmac
from http.cookies import SimpleCookie

COOKIE = "loradock_session"


def session_value(token: str) -> str:
    return hmac.new(token.encode(), b"loradock console session", hashlib.sha256).hexdigest()


def has_session(cookie_header: bytes | str | None, token: str) -> bool:
    """Whether a Cookie header carries the session of `token` (constant time)."""
    if not cookie_header:
        return False
    cookies = SimpleCookie()
    try:
        cookies.load(cookie_header.decode("latin-1") if isinstance(cookie_header, bytes) else cookie_header)
    except Exception:  # a malformed Cookie header is no session
        return False
    given = cookies.get(COOKIE)
    return given is not None and hmac.compare_digest(given.value, session_value(token))


def presents_token(authorization: bytes | str | None, cookie_header: bytes | str | None, token: str) -> bool:
    """Whether a request carries `token`: as `Authorization: Bearer <token>` when it sends that
    header (it decides then), else as the console's session cookie; constant time."""
    if authorization is not None:
        given = authorization.encode("latin-1") if isinstance(authorization, str) else authorization
        return hmac.compare_digest(given, f"Bearer {token}".encode())
    return has_session(cookie_header, token)


def set_cookie_header(token: str, secure: bool) -> str:
    return (f"{COOKIE}={session_value(token)}; Path=/; HttpOnly; SameSite=Strict"
            + ("; Secure" if secure else ""))


def clear_cookie_header() -> str:
    return f"{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"
