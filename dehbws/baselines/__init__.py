"""Baselines of the DEHB-WS study: a fixed CNN, SMAC4MF and the JAHS-Bench-201 surrogate.

Vanilla DEHB is a search method of the coordinator itself (`method="dehb"`).
"""
