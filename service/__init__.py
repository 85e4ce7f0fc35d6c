"""The gateway: an HTTP front for the Triton model repository.

It does what needs the request (reading, decoding, cropping, routing, answering) and leaves
what needs the accelerator (networks, batching, the Triton ensemble) to Triton. It never
imports torch: the gateway image must stay small and start fast, and everything the models
need is in the repository that Triton serves.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
