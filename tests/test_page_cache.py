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


def get(app, path: str = "/", host: bytes = b"a:1", method: str = "GET", query: bytes = b"",
        headers: tuple[tuple[bytes, bytes], ...] = (), started: list | None = None) -> bytes:
    """One request through ``app``; the response body (and its start message appended to ``started``)."""
    out: list[bytes] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        if message["type"] == "http.response.body":
            out.append(message.get("body", b""))
        elif started is not None:
            started.append(message)

    scope = {"type": "http", "method": method, "path": path, "query_string": query, "scheme": "http",
             "root_path": "", "headers": [(b"host", host), (b"accept", b"*/*"), *headers]}
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


def test_a_query_or_a_server_header_is_answered_afresh_and_not_kept():
    """``x-gradio-server`` sets the page's root URL: one request must not choose it for every later visitor."""
    page = Page()
    cache = PageCache(page)
    assert get(cache, query=b"__theme=dark").endswith(b"#1") and get(cache, query=b"__theme=dark").endswith(b"#2")
    assert get(cache, headers=((b"X-Gradio-Server", b"http://elsewhere/"),)).endswith(b"#3")
    assert not cache.pages and get(cache).endswith(b"#4") and get(cache).endswith(b"#4")


def test_outer_middlewares_headers_are_neither_kept_nor_piled_up():
    """CORS (outside the cache) edits the start message's headers in place, per request: the kept copy is the app's."""
    page = Page()
    cache = PageCache(page)

    async def cors(scope, receive, send):  # like Gradio's: adds to the very message it is handed
        async def edit(message):
            if message["type"] == "http.response.start":
                origin = dict(scope["headers"]).get(b"origin")
                if origin:
                    message["headers"] += [(b"access-control-allow-origin", origin), (b"vary", b"Origin")]
            await send(message)
        await cache(scope, receive, edit)

    starts: list = []
    get(cors, headers=((b"origin", b"http://one.example"),), started=starts)
    get(cors, started=starts)
    for _ in range(3):
        get(cors, headers=((b"origin", b"http://two.example"),), started=starts)
    names = [[k for k, _ in m["headers"]] for m in starts]
    assert page.renders == 1 and b"access-control-allow-origin" not in names[1]  # no other visitor's origin
    assert [n.count(b"vary") for n in names] == [1, 0, 1, 1, 1]  # one per response, never piling up


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
    first = httpx.get(url + "/", headers={"Origin": "http://other.example"})  # the fresh render
    plain, again = httpx.get(url + "/"), httpx.get(url + "/")  # kept copies
    cache = _cache_in(demo.app)
    assert cache is not None and (cache.misses, cache.hits) == (1, 2)
    assert first.status_code == plain.status_code == 200 and plain.content == again.content == first.content
    assert plain.content.lstrip().lower().startswith(b"<!doctype html")
    assert "access-control-allow-origin" not in plain.headers  # the first visitor's CORS answer is not kept
    assert httpx.get(url + "/config").json()["root"] in plain.text  # this server's own address
    logged, url2 = served(auth="alice:pw")
    assert httpx.get(url2 + "/").status_code == 200 and _cache_in(logged.app) is None  # the page names the user
