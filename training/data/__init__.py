"""Data sets as in-memory uint8 arrays."""
