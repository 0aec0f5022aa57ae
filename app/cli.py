"""Command-line entry points (placeholder until the CLI lands)."""


def main() -> None:
    print("not yet")


def serve_main(argv: list[str] | None = None) -> None:
    """`ddpm-serve [--model REF]... [--host H] [--port P] [--device D]` (see app/serve.py)."""
    from app.serve import main as serve

    serve(argv)


def worker_main() -> None:
    print("not yet")
