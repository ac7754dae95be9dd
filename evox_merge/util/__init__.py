"""Small helpers every layer may use: error classes, atomic writes, hashes, the machine description, strict
pydantic models."""
