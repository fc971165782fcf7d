"""Filesystem primitives: atomic writes, the write lock, file names, fault points."""
