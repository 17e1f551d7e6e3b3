"""The repository's test tooling, kept out of the installed ``refimpl`` package: building the
real llama.cpp peers and their C preload shims, running servers as child processes, graph
builders and hypothesis strategies for the tests, conformance suite, fuzz campaigns and
benchmarks, the op-table generator (which writes the product data
``refimpl/protocol/op_tables.json``), and the numba CUDA-simulator hook (:mod:`.cuda_sim`).

Run its command-line tools from the repository root, e.g. ``PYTHONPATH=. python -m
tools.peers``; pytest finds it through ``pythonpath`` in pyproject.toml.
"""
