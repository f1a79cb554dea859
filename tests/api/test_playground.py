"""GET / serves the browser playground (parley/api/playground): its files, open without the key
while every API route stays behind it, TGI's POST / unchanged, and --no-playground.

The page's behaviour in a real browser: tests/api/test_playground_browser.py."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import httpx
import pytest

from server import API_KEY, CLIENT_TIMEOUT_S, ServerProcess

HERE = Path(__file__).parent
REPO = HERE.parent.parent
STATIC = REPO / "parley" / "api" / "playground" / "static"
BEARER = {"authorization": f"Bearer {API_KEY}"}


def fake_server(tmp_path_factory, name: str, *args: str) -> ServerProcess:
    return ServerProcess([sys.executable, str(HERE / "fake_server.py"), "serve", *args],
                         tmp_path_factory.mktemp(name) / "server.log").start()


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    proc = fake_server(tmp_path_factory, "playground-key", "--api-key", API_KEY)
    with httpx.Client(base_url=proc.url, timeout=CLIENT_TIMEOUT_S) as client:
        yield client
    proc.stop()


def local_references(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^":]+)"', html)


def test_the_page_and_every_file_it_references_are_served_without_the_key(keyed):
    page = keyed.get("/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert "<title>Parley playground</title>" in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "default-src 'none'" in csp
    references = local_references(page.text)
    assert sorted(references) == ["docs", "playground/app.js", "playground/style.css"]
    for path, media_type in (("/playground/app.js", "text/javascript"), ("/playground/style.css", "text/css")):
        r = keyed.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith(media_type)
        assert r.content == (STATIC / Path(path).name).read_bytes()


def test_nothing_else_opens_without_the_key(keyed):
    """Only GET of the page's three paths is open: TGI's POST / and every API route the page calls
    want the key (the page sends it), and so does any other path under /playground/."""
    assert keyed.post("/", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}).status_code == 401
    for path in ("/info", "/v1/models", "/metrics", "/playground/other.js", "/docs"):
        assert keyed.get(path).status_code == 401, path
    assert keyed.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]}).status_code == 401


def test_tgi_post_root_is_unchanged(keyed):
    r = keyed.post("/", headers=BEARER, json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}})
    assert r.status_code == 200 and isinstance(r.json(), list) and len(r.json()[0]["generated_text"]) == 3


def test_info_reports_the_top_logprobs_limit(keyed):
    """The page asks for min(5, max_top_n_tokens) alternatives per token."""
    assert keyed.get("/info", headers=BEARER).json()["max_top_n_tokens"] == 5


def test_no_playground_flag(tmp_path_factory):
    proc = fake_server(tmp_path_factory, "no-playground", "--no-playground")
    try:
        with httpx.Client(base_url=proc.url, timeout=CLIENT_TIMEOUT_S) as client:
            assert client.get("/").status_code == 405  # as before the playground: POST / only
            assert client.get("/playground/app.js").status_code == 404
            assert client.post("/", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}).status_code == 200
    finally:
        proc.stop()


def test_the_wheel_carries_the_page():
    """pyproject's package data names every file the page is made of (none is left out of a wheel)."""
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = package_data["parley.api.playground"]
    files = sorted(p.relative_to(STATIC.parent) for p in STATIC.iterdir())
    assert [str(f) for f in files] == ["static/app.js", "static/index.html", "static/style.css"]
    assert all(any(f.match(pattern) for pattern in patterns) for f in files)
