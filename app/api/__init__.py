"""The HTTP layer: FastAPI app factory, routers, schemas, dependencies and error mapping."""

from app.api.app import create_app

__all__ = ["create_app"]
