"""Shared fixtures of the deployment tests."""

import pytest

from app.api import create_app
from app.settings import Settings


@pytest.fixture(scope="session")
def app_routes() -> set[str]:
    """The paths the FastAPI app serves, from its OpenAPI document (built, not started: no model loads)."""
    return set(create_app(Settings()).openapi()["paths"])


@pytest.fixture(scope="session")
def app_query_parameters() -> dict[str, set[str]]:
    """The query parameters each GET path of the app takes, from its OpenAPI document."""
    paths = create_app(Settings()).openapi()["paths"]
    return {
        path: {p["name"] for p in methods["get"].get("parameters", []) if p["in"] == "query"}
        for path, methods in paths.items()
        if "get" in methods
    }
