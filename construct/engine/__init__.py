"""Training and evaluation loops, kept apart from the model code."""
