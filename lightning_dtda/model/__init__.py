"""The module of a recorded run, and per-example gradients of it."""
