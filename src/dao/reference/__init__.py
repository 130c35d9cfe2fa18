"""Pure-PyTorch twins of every op in :mod:`dao.ops`: same signature, plain autograd.

They are the CPU fallback, the test oracle and the benchmark baseline at once.
"""
