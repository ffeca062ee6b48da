"""medrwr.eval.datasets layer (planned; see docs/architecture.md)."""
