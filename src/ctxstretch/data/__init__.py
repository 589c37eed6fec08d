"""Data: sources, synthetic probes and row builders."""
