"""The domain objects of the core, one owner per kind of state (STYLE 12):
identity (the token-id and identity formats), accounts, presence, limits, nonces. Rooms
live in chatd.rooms. Nothing here touches a socket; events leave as Outcomes through
chatd.bus."""
