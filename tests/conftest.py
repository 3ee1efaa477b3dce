"""Shared fixtures: tiny diffusers transformers built in code (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch
from tiny_models import tiny_wan

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def wan_model():
    return tiny_wan()
