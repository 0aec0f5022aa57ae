"""The HTTP layer: FastAPI app factory, routers, schemas, dependencies and error mapping."""
