"""Shared fixtures of the deployment tests."""

import pytest

from app.api import create_app
from app.settings import Settings


@pytest.fixture(scope="session")
def app_routes() -> set[str]:
    """The paths the FastAPI app serves, from its OpenAPI document (built, not started: no model loads)."""
    return set(create_app(Settings()).openapi()["paths"])
