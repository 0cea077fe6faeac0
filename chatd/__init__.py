"""chatd: a chat server spoken over raw TCP, one JSON object per line.

Importing the package (or ``chatd.protocol``) loads none of the server: no asyncio, no
sqlite3, no JWT or password hashing (a test checks it over ``sys.modules``)."""

from chatd.version import VERSION as __version__

__all__ = ["__version__"]
