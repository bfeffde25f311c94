"""Set-up shared by the TRL integration tests.

A TRL trainer with bf16 leaves accelerate's process-wide state in bf16 mixed precision, and a later
``Accelerator()`` in the same process (the slim trainer's tests) would inherit it. Each test here resets
that state when it ends.
"""

import pytest
from accelerate.state import AcceleratorState


@pytest.fixture(autouse=True)
def reset_accelerate_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
