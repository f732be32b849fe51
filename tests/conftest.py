import pytest
import torch


@pytest.fixture(autouse=True)
def restore_threads():
    """Runs may set torch's thread count (train.threads); keep that from leaking into other tests."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
