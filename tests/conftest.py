import os

# Triton kernels run on the CPU interpreter here; must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def encoder():
    import fastforget as ff

    return ff.load_encoder("demo")


@pytest.fixture(scope="session")
def demo_model():
    import fastforget as ff

    return ff.load("demo")
