"""Data sources in the candidate-row schema: the synthetic cascade-log generator and converters."""
