"""Durable storage of received instances (the spool) and the state DB that indexes them."""
