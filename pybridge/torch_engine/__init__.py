"""The torch engine: solvers written natively in PyTorch (the reference implementation)."""
