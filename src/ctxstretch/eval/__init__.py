"""Evaluation: retrieval probes (passkey, needle), loss by position, reports."""
