import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY_DATASET = "pointmaze-medium-navigate-v0"


@pytest.fixture(scope="session")
def tiny_dataset_dir(tmp_path_factory):
    """A tiny generated pointmaze dataset: 4 training episodes of 60 steps (+1 validation episode)."""
    from ogbench_utils import generate
    directory = tmp_path_factory.mktemp("datasets")
    generate(TINY_DATASET, episodes=4, max_steps=60, seed=0, dataset_dir=str(directory), progress=False)
    return str(directory)
