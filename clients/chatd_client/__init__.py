"""The asyncio client library for chatd (see README)."""
