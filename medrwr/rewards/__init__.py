"""medrwr.rewards layer (see DESIGN.md)."""
