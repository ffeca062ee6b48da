"""medrwr.eval layer (planned; see docs/architecture.md)."""
