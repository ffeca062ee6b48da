"""medrwr.rollout.backends layer (see DESIGN.md)."""
