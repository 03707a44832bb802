import os

import pytest
import torch

# Without a GPU, Triton kernels run under the interpreter on CPU tensors. Triton reads this when the
# backend module is imported (possibly during collection), so it must be set before any test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs per test, but reproducible from the test id (printed on failure)."""
    seed = abs(hash(request.node.nodeid)) % (2**31)
    torch.manual_seed(seed)
    return seed
