"""Command handlers: plain async functions by area, each ``(app, req, cmd) -> reply data``."""
