"""tta's benchmark scripts, run from the repository root as modules:
``TTA_HOME=../shared python -m benchmarks.<script> ...`` (see benchmarks/README.md)."""
