"""Test-suite settings: the CLI's persistent JAX compilation cache stays off (no writes to $HOME)."""

import os

os.environ["PPREG_COMPILATION_CACHE"] = "0"
