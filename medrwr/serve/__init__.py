"""medrwr.serve layer (planned; see docs/architecture.md)."""
