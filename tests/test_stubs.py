"""The committed _core.pyi is what pybind11-stubgen generates from the built module."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

import dynamic_core

STUB = pathlib.Path(dynamic_core.__file__).parent / "_core.pyi"


def test_stub_is_current(tmp_path):
    pytest.importorskip("pybind11_stubgen")
    subprocess.run([sys.executable, "-m", "pybind11_stubgen", "dynamic_core._core", "-o", str(tmp_path)],
                   check=True, capture_output=True)
    generated = (tmp_path / "dynamic_core" / "_core.pyi").read_text()
    assert STUB.exists(), "python/dynamic_core/_core.pyi is missing"
    assert generated == STUB.read_text(), (
        "stubs are stale: run `pybind11-stubgen dynamic_core._core -o python` from the repo root")


def test_public_api_is_exported():
    for name in dynamic_core.__all__:
        assert hasattr(dynamic_core, name), name
    assert (STUB.parent / "py.typed").exists()
