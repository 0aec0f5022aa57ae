"""GET / and its two assets over HTTP (the browser test, test_page.py, drives the page itself)."""

from __future__ import annotations

import pytest

from tests.api.conftest import live_server, server_settings

pytestmark = pytest.mark.service


def test_the_page_and_its_assets_are_served_and_nothing_else(model_dirs):
    with live_server(server_settings(model_dirs[:1])) as live, live.client() as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "connect-src 'self'" in page.headers["content-security-policy"]
        expected = {
            "api.js": ("text/javascript", "X-API-Key"),
            "png.js": ("text/javascript", "IHDR"),
            "app.js": ("text/javascript", '"/sample"'),
            "style.css": ("text/css", "pixelated"),
        }
        for name, (media_type, content) in expected.items():
            assert f"static/{name}" in page.text
            asset = client.get(f"/static/{name}")
            assert asset.headers["content-type"].startswith(media_type) and content in asset.text
        for other in ("/static/index.html", "/static/..%2Fapp.py", "/static/missing.js"):
            refused = client.get(other)
            assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found"
        # The page is a client of the API, not part of it.
        assert not {"/", "/static/{name}"} & set(client.get("/openapi.json").json()["paths"])
