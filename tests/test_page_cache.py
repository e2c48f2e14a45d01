"""The workbench page from memory (workbench.page_cache.PageCache): the same bytes as a fresh render, per host, never
for other requests, never with a login."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from test_workbench_safety import served  # noqa: F401 - the fixture: a running workbench on an empty workdir

from workbench.page_cache import PageCache


class Page:
    """A stand-in ASGI app: answers with ``status``, a body naming the request and how often it rendered."""

    def __init__(self, status: int = 200, cookie: bool = False, chunks: int = 1) -> None:
        self.status, self.cookie, self.chunks, self.renders = status, cookie, chunks, 0

    async def __call__(self, scope, receive, send) -> None:
        self.renders += 1
        headers = [(b"content-type", b"text/html")] + ([(b"set-cookie", b"a=1")] if self.cookie else [])
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        host = dict(scope["headers"]).get(b"host", b"").decode()
        body = f"{scope['method']} {scope['path']} {host} #{self.renders}".encode()
        for i in range(self.chunks):
            await send({"type": "http.response.body", "body": body, "more_body": i < self.chunks - 1})


def get(app, path: str = "/", host: bytes = b"a:1", method: str = "GET") -> bytes:
    """One request through ``app``; the response body."""
    out: list[bytes] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        if message["type"] == "http.response.body":
            out.append(message.get("body", b""))

    scope = {"type": "http", "method": method, "path": path, "query_string": b"", "scheme": "http",
             "root_path": "", "headers": [(b"host", host), (b"accept", b"*/*")]}
    asyncio.run(app(scope, receive, send))
    return b"".join(out)


def test_the_page_renders_once_per_host_and_nothing_else_is_kept():
    page = Page()
    cache = PageCache(page, max_entries=2)
    first = get(cache)
    assert get(cache) == first == b"GET / a:1 #1" and page.renders == 1 and (cache.hits, cache.misses) == (1, 1)
    assert get(cache, host=b"b:2") == b"GET / b:2 #2"  # another host: another root URL in the page
    assert get(cache, "/config") == b"GET /config a:1 #3" and get(cache, "/config").endswith(b"#4")  # not the page
    assert get(cache, method="HEAD").endswith(b"#5") and page.renders == 5
    get(cache, host=b"c:3")  # a third variant: the oldest (a:1) is dropped
    assert get(cache).endswith(b"#7") and len(cache.pages) == 2


@pytest.mark.parametrize("kind", [{"status": 500}, {"cookie": True}, {"chunks": 2}])
def test_an_error_a_cookie_or_a_streamed_body_is_not_kept(kind):
    page = Page(**kind)
    cache = PageCache(page)
    get(cache)
    get(cache)
    assert page.renders == 2 and not cache.pages


def _cache_in(app) -> PageCache | None:
    """The PageCache instance in a running app's middleware stack, if any."""
    layer = app.middleware_stack
    while layer is not None and not isinstance(layer, PageCache):
        layer = getattr(layer, "app", None)
    return layer


def test_the_served_page_is_a_fresh_render_and_a_login_leaves_the_cache_out(served):  # noqa: F811
    demo, url = served()
    compressed = httpx.get(url + "/", headers={"Accept-Encoding": "br"})  # the fresh render (compression is outside)
    plain, again = httpx.get(url + "/"), httpx.get(url + "/")  # kept copies
    cache = _cache_in(demo.app)
    assert cache is not None and (cache.misses, cache.hits) == (1, 2)
    assert compressed.status_code == plain.status_code == 200 and plain.content == again.content
    assert plain.content.lstrip().lower().startswith(b"<!doctype html") and compressed.text == plain.text
    assert httpx.get(url + "/config").json()["root"] in plain.text  # this server's own address
    logged, url2 = served(auth="alice:pw")
    assert httpx.get(url2 + "/").status_code == 200 and _cache_in(logged.app) is None  # the page names the user
