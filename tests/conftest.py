"""Shared fixtures: demo trees made by gist_exp.data.fake and Hydra `compose` configs."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from gist_exp.data import fake
from gist_exp.train import CONF_DIR


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """dtd and eurosat, 1000 train / 200 test images of 64x48 (session-wide: read-only for tests)."""
    root = tmp_path_factory.mktemp("vtab")
    for task in ("dtd", "eurosat"):
        fake.make_task(root, task, train=1000, test=200)
    return root


@pytest.fixture
def small_root(tmp_path) -> Path:
    """A private small tree a test may damage."""
    root = tmp_path / "vtab"
    fake.make_task(root, "dtd", train=40, test=20)
    return root


@pytest.fixture
def make_cfg():
    """Hydra's compose API on the project's conf/, as the entry point sees it."""
    def _make(*overrides: str):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides))
    return _make
