import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory):
    """A private shapes dataset root shared by the tests of one session."""
    return str(tmp_path_factory.mktemp("datasets"))
