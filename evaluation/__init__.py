"""Accuracy of the served models on a labelled folder, beside the paper's figures.

It lives outside both `inception` and `service` because it uses both: the gateway's own
preprocessing (`--local`) and the networks, and the model package must never depend on
the gateway. `python -m evaluation` runs it.
"""
