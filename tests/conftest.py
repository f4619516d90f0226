"""Test-suite settings: the CLI's persistent JAX compilation cache stays off (no writes to $HOME), and the
heaviest test files are scheduled first."""

import os

os.environ["PPREG_COMPILATION_CACHE"] = "0"

# The suite runs on two pytest-xdist workers, one file at a time each (pyproject.toml's addopts). Files are
# handed out in collection order, so the longest ones (pytest --durations, 2 cores) go first: a long file
# started last would leave one worker alone at the end.
HEAVY_FIRST = ("test_secure_ckks.py", "test_party_schemes.py", "test_party_processes.py", "test_learned_register.py",
               "test_register.py", "test_learned_train.py", "test_learned_suits_register.py", "test_learned_suits.py",
               "test_learned_alpha.py", "test_secure_bspline.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FIRST)))  # stable: the rest keep their order
