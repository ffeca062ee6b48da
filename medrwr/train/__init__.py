"""medrwr.train layer (see DESIGN.md)."""
