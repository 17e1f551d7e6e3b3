"""Capturing ggml RPC conversations (spec/captures.md): the file format, the recording proxy
``refimpl-capture``, annotated traces, and replay."""
