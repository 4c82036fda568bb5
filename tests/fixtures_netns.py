"""Network namespaces as separate hosts for multi-host tests."""
