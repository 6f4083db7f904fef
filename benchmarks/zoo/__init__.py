"""The offline model zoo's trainer (``python -m benchmarks.zoo.train``) and the
ensemble table (``python -m benchmarks.zoo.ensemble``); see benchmarks/zoo/README.md."""
