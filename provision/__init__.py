"""Provisioning over SSH: set Clef up on the device and prove the keys stay there.

Importable and testable without invoke; tasks.py only parses flags and prints.
"""
