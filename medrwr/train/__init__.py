"""medrwr.train layer (planned; see docs/architecture.md)."""
