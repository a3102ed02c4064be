"""Example data and models built from code, for the demo, the tests and the benchmarks."""
