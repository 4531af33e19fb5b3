"""Shared test configuration: markers that skip when their resource is absent."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# CLI runs use the plain torch network unless a test asks for another runtime (an export takes
# ~20 s and would be repeated for every tiny random test model)
os.environ.setdefault("CONIC_QP_RUNTIME", "torch")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CONIC_QP_SHARED_DATA", REPO.parent / "shared" / "data"))
#: The live OMERO tests run when these are set (see docs/omero.md, "Testing").
OMERO_TEST_ENV = ("OMERO_TEST_HOST", "OMERO_TEST_USER", "OMERO_TEST_PASSWORD")


def _has_gpu() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover
        return False


def _has_qupath() -> bool:
    """paquo imports and finds a QuPath installation the way paquo does (its settings:
    ``PAQUO_QUPATH_DIR``, ``.paquo.toml``, default search folders), without starting Java."""
    from conic_qp.qupath.paquo_io import paquo_available

    return paquo_available()


def _has_omero_py() -> bool:
    """omero-py and its Ice runtime import (the `omero` extra is installed); no server needed."""
    if importlib.util.find_spec("omero") is None or importlib.util.find_spec("Ice") is None:
        return False
    try:
        import Ice  # noqa: F401
        import omero.clients  # noqa: F401
    except Exception:
        return False
    return True


def _has_omero_server() -> bool:
    return _has_omero_py() and all(os.environ.get(k) for k in OMERO_TEST_ENV)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skips = {
        "shared_data": (SHARED_DATA.is_dir(), f"needs real data at {SHARED_DATA}"),
        "gpu": (None, "needs a CUDA GPU"),
        "qupath": (None, "needs QuPath + paquo"),
        "omero": (None, "needs omero-py + zeroc-ice (pip install '.[omero]', see docs/omero.md)"),
        "omero_live": (
            None,
            "needs an OMERO server: set " + ", ".join(OMERO_TEST_ENV) + " (see docs/omero.md)",
        ),
    }
    checks = {
        "gpu": _has_gpu,
        "qupath": _has_qupath,
        "omero": _has_omero_py,
        "omero_live": _has_omero_server,
    }
    for item in items:
        for name, (available, reason) in skips.items():
            if item.get_closest_marker(name) is None:  # a marker, not any keyword (folder names)
                continue
            if available is None:
                available = checks[name]()
                skips[name] = (available, reason)
            if not available:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of ../shared/data (tests using it must be marked ``shared_data``)."""
    return SHARED_DATA
