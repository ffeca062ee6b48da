"""medrwr.serve layer (see DESIGN.md)."""
