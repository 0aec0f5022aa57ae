"""Command-line entry points (placeholder until the CLI lands)."""


def main() -> None:
    print("not yet")


def serve_main() -> None:
    print("not yet")


def worker_main() -> None:
    print("not yet")
