"""Recorded runs on disk: the file format, the readers of older formats, and read-only views of runs."""
