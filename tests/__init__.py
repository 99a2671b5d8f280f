"""pybridge test suite (a package, so `tests.*` helpers resolve here and not to a site-packages `tests`)."""
