"""medrwr.eval.datasets layer (see DESIGN.md)."""
