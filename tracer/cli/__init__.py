"""The keytrace command (typer + rich): a front-end, thin. tracer.cli.app holds the commands."""
import sys

__all__ = ["app", "main"]


def main() -> None:
    if sys.argv[1:2] == ["agent"]:
        # Always on: only what the agent needs is loaded (no pandas, no pyarrow).
        from .agent import main as run_agent
        run_agent()
        return
    from .app import main as run
    run()


def __getattr__(name: str):
    if name == "app":
        from .app import app
        return app
    raise AttributeError(name)
