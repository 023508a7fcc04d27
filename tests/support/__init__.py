"""What the tests share and no shipped package may carry: test doubles, emulators and helpers.

Tests import it as ``support`` (pytest puts tests/ on ``sys.path``: ``pythonpath`` in the
root pyproject.toml), e.g. ``from support.ascend_emulation import KERNELS``.

- :mod:`support.numerics`: the comparison the operator tests use, with the tolerance table;
- :mod:`support.ascend_schemas`: torch-npu's operator schemas, read out of its wheel and
  registered under ``torch.ops.npu`` without an NPU;
- :mod:`support.ascend_emulation`, :mod:`support.ascend_graph_emulation`: CPU emulations of
  the torch-npu operators and graph API the Ascend backend calls.
"""
