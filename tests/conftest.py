"""Shared test setup.

Triton kernels run on CPU tensors through Triton's interpreter here (no GPU in CI): the
variable must be set before anything imports triton (torch._dynamo does). On a GPU machine,
run the tests with TRITON_INTERPRET=0 to compile them for the device instead.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

# The checkpoint builders and fixtures of conftest_loaders are plugins of every test.
pytest_plugins = ["conftest_loaders"]
