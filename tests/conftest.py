import os
import secrets

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The
# variable must be set before triton.jit decorates the kernels (at first import).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def fresh_seed():
    """Fresh random inputs every run; the seed is printed so a failure can be replayed
    with SHORTCUT_TEST_SEED=<seed>."""
    seed = int(os.environ.get("SHORTCUT_TEST_SEED", secrets.randbits(31)))
    torch.manual_seed(seed)
    print(f"SHORTCUT_TEST_SEED={seed}")
    yield seed


@pytest.fixture
def one_thread():
    """Toy models run ~100x faster on one thread than with OpenMP on a loaded 2-core box."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
