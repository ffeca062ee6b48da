"""medrwr.eval layer (see DESIGN.md)."""
