"""The keytrace command (typer + rich): a front-end, thin. tracer.cli.app holds the commands."""
import sys

__all__ = ["app", "main"]


def main() -> None:
    if sys.argv[1:2] == ["agent"]:
        # The agent never writes Parquet, and pandas imports pyarrow whenever it can: ~40 MB
        # resident for good. A None entry makes that import fail, as if pyarrow were absent.
        sys.modules.setdefault("pyarrow", None)
    from .app import main as run
    run()


def __getattr__(name: str):
    if name == "app":
        from .app import app
        return app
    raise AttributeError(name)
