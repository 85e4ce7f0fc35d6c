"""The HTTP routes, one module per subject, each with a module-level ``router``."""
