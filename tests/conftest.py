import os

# Triton kernels run on the CPU through Triton's interpreter; it reads this when triton is
# first imported, so it is set before anything imports it.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory):
    """A private shapes dataset root shared by the tests of one session."""
    return str(tmp_path_factory.mktemp("datasets"))
