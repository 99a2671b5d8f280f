"""The papers' experiments on offline data (run as modules: python -m experiments.<name>)."""
