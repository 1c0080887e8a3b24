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
    # the experiments' end-to-end runs take minutes each on 2 cores: opt-in, so that `make test`
    # keeps to its budget (`make bench` runs the same code paths in its sections)
    run_slow = os.environ.get("SHORTCUT_SLOW_TESTS") == "1"
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    slow = pytest.mark.skip(reason="an experiment end to end: set SHORTCUT_SLOW_TESTS=1")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(slow)
