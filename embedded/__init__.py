"""The embedded CPU stack: a real tritonserver from the `nvidia-pytriton` wheel and the
gateway, on a machine with no GPU and no Docker. Imports no torch."""
