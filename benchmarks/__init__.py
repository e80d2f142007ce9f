"""Benchmarks of cmedl-jax (not imported by the library): each runs from the repository root as
`python -m benchmarks.NAME` (see each module's docstring)."""
