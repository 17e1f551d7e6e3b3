"""The protocol core's public surface: what ``import refimpl.protocol`` costs and exports."""

import subprocess
import sys

import pytest

import refimpl.protocol


def test_protocol_core_imports_without_numba():
    """The sans-IO core needs the standard library and numpy only (no compiler at import)."""
    code = ("import sys, refimpl.protocol; "
            "bad = sorted(m for m in ('numba', 'llvmlite', 'trio') if m in sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_star_import_exports_only_protocol_names():
    namespace = {}
    exec("from refimpl.protocol.messages import *", namespace)
    assert not {"np", "dataclass", "field", "ClassVar"} & set(namespace)
    from refimpl.protocol import connection
    assert "GraphComputeRequest" not in connection.__all__


def test_every_module_declares_its_public_names():
    import importlib
    import pkgutil
    for info in pkgutil.iter_modules(refimpl.protocol.__path__):
        module = importlib.import_module(f"refimpl.protocol.{info.name}")
        assert hasattr(module, "__all__"), info.name
        assert all(hasattr(module, n) for n in module.__all__), info.name
    assert all(hasattr(refimpl.protocol, n) for n in refimpl.protocol.__all__)


def test_out_of_range_values_are_local_errors():
    from refimpl.protocol import LocalProtocolError, messages as m
    with pytest.raises(LocalProtocolError):
        m.AllocBufferRequest(0, -1)
    with pytest.raises(LocalProtocolError):
        m.BufferClearRequest(1, 256)
    with pytest.raises(LocalProtocolError):
        m.SetTensorRequest(offset=2**64)
    with pytest.raises(LocalProtocolError):
        refimpl.protocol.RpcTensor(type=-1).encode()


def test_any_error_in_next_event_moves_to_error():
    from refimpl.protocol import RemoteProtocolError, ServerConnection, State
    c = ServerConnection()
    c.receive_data(bytes([200]) + bytes(8))
    with pytest.raises(RemoteProtocolError):
        c.next_event()
    assert c.state is State.ERROR
