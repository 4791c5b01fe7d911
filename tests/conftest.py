import os
import random

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same seeds, so a failure reproduces."""
    random.seed(0)
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    return f"torch {torch.__version__}, threads {torch.get_num_threads()}, CI={os.environ.get('CI', '')!r}"
