"""Throttling by the server: recognised in a test's exception or in a response, paused for,
retried, and learnt from. Pure logic; the pytest glue lives in ``retrying``."""
