"""The public LM-head ops: validation, backend choice, reshaping."""
