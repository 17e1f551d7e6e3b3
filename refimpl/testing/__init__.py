"""Helpers shared by the tests, the conformance suite, the fuzz campaigns and the benchmarks:
building the real llama.cpp peers, and running servers as child processes."""
