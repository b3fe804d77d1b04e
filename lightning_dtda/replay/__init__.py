"""Replaying a recorded run exactly: the engine, exact twins of stochastic layers, functional optimizers, checks."""
