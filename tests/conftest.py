"""Test setup: Triton runs in interpreter mode on the CPU; GPU tests skip cleanly without a GPU."""

import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# folders saved by tests are trusted in a list of the test run's own, not the user's
os.environ.setdefault("INFERPASS_TRUST_LIST", os.path.join(tempfile.mkdtemp(prefix="inferpass-trust-"), "trusted.txt"))

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=6,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
# each pytest-xdist worker (make test runs one per core) gets its share of at most 2 cores
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


HELDOUT_SLICE = 8192  # held-out bytes scored in tests (8 windows of 1024)


@pytest.fixture(scope="session")
def lm_program():
    """The shipped default LM, captured once per test session (cache of 1024 slots)."""
    from inferpass.capture import capture
    from inferpass.defaults import DEFAULT_MODEL

    return capture(DEFAULT_MODEL, max_len=1024)


@pytest.fixture(scope="session")
def heldout() -> bytes:
    """The first ``HELDOUT_SLICE`` bytes of the shipped held-out text."""
    from inferpass.defaults import HELDOUT_TEXT

    return HELDOUT_TEXT.read_bytes()[:HELDOUT_SLICE]
