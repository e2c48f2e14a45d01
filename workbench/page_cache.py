"""The workbench page, rendered once and served from memory: an ASGI middleware for ``GET /``.

    from starlette.middleware import Middleware
    demo.launch(..., app_kwargs={"middleware": [Middleware(PageCache)]})   # what workbench.app.launch does

Why: Gradio renders its page for every GET. It deep-copies the whole page config (0.4 MB for the workbench: ~170
components and ~140 events), walks it to rewrite file URLs, and renders the HTML template: about half of the
server's CPU for a new tab (py-spy on the server under repeated page loads), all of it under the interpreter lock,
so 20 tabs opened at once wait for each other. Without a login the page is the same bytes for every request with
the same URL and the same host and proxy headers (the config's ``root`` comes from them; the page holds no session
and sets no cookie), so the first response for each such request is kept and sent again.

Only a plain ``GET`` of one of ``paths`` with no query string and no ``x-gradio-server`` header (Gradio takes the
page's root URL from it: one request must not choose the address every later visitor's page talks to) that the app
answers with 200, a single body and no ``set-cookie`` is kept; everything else passes through. What is kept is the
app's own response, copied before the outer middlewares (CORS, compression) add their per-request headers to it,
and each visitor gets a fresh copy of it for them to add theirs to. Do not install it on an app with a login (the
page then names the user): :func:`workbench.app.launch` leaves it out when ``auth`` is given. At most
``max_entries`` variants are kept (the oldest is dropped first).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# the request headers the page depends on: Gradio builds the config's root URL from the host and proxy headers
KEY_HEADERS = (b"host", b"x-forwarded-host", b"x-forwarded-proto", b"x-forwarded-port", b"x-forwarded-prefix",
               b"x-forwarded-path", b"forwarded")
PASS_HEADERS = (b"x-gradio-server",)  # a request with one of these is answered afresh and not kept


class PageCache:
    """ASGI middleware keeping the app's page per request shape (see the module docstring)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], paths: tuple[str, ...] = ("/",),
                 max_entries: int = 32) -> None:
        self.app, self.paths, self.max_entries = app, tuple(paths), int(max_entries)
        self.pages: OrderedDict[tuple, tuple[Message, bytes]] = OrderedDict()
        self.hits = self.misses = 0

    def key(self, scope: Scope) -> tuple | None:
        """What the page kept for this request depends on, or None when the request is answered afresh (not a plain
        ``GET`` of one of ``paths``, a query string, or a header of ``PASS_HEADERS``)."""
        if (scope.get("type") != "http" or scope.get("method") != "GET" or scope.get("path") not in self.paths
                or scope.get("query_string")):
            return None
        headers = {k.lower(): v for k, v in scope.get("headers", ())}
        if any(h in headers for h in PASS_HEADERS):
            return None
        shown = tuple(headers.get(h) for h in KEY_HEADERS)
        return scope.get("scheme"), scope.get("root_path", ""), scope["path"], shown

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = self.key(scope)
        if key is None:
            await self.app(scope, receive, send)
            return
        page = self.pages.get(key)
        if page is not None:
            self.hits += 1
            start, body = page
            await send(_copy(start))  # outer middlewares edit the message's headers in place
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return
        self.misses += 1
        sent: list[Message] = []

        async def keep(message: Message) -> None:
            sent.append(_copy(message))  # as the app sent it, before the outer middlewares add to its headers
            await send(message)

        await self.app(scope, receive, keep)
        self._remember(key, sent)

    def _remember(self, key: tuple, sent: list[Message]) -> None:
        """Keep a 200 response with one body and no cookie; anything else is not kept."""
        if len(sent) != 2 or sent[0].get("type") != "http.response.start" or sent[0].get("status") != 200:
            return
        body = sent[1]
        if body.get("type") != "http.response.body" or body.get("more_body"):
            return
        if any(k.lower() == b"set-cookie" for k, _ in sent[0].get("headers", ())):
            return
        self.pages[key] = (sent[0], bytes(body.get("body", b"")))
        while len(self.pages) > self.max_entries:
            self.pages.popitem(last=False)


def _copy(message: Message) -> Message:
    """``message`` with its own list of headers (the rest is not edited by middlewares)."""
    out = dict(message)
    if "headers" in out:
        out["headers"] = [(bytes(k), bytes(v)) for k, v in out["headers"]]
    return out
