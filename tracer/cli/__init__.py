"""The keytrace command (typer + rich): a front-end, thin. tracer.cli.app holds the commands."""
from .app import app, main

__all__ = ["app", "main"]
