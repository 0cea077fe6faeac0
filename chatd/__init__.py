"""chatd: a chat server spoken over raw TCP, one JSON object per line."""

from chatd.app import VERSION as __version__

__all__ = ["__version__"]
