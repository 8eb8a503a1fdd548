"""gleap."""
