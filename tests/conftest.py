import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(os.environ.get("FTKIT_BAGEL_FIXTURE", REPO.parent / "shared" / "fixtures" / "bagel-tiny"))


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    if not (FIXTURE / "ema.safetensors").is_file():
        pytest.fail(f"BAGEL parity fixture not found at {FIXTURE} (set FTKIT_BAGEL_FIXTURE)")
    return FIXTURE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
