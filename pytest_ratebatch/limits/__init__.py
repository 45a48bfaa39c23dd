"""The arithmetic of limits: what decides whether a start may go, and when.

Pure and synchronous: integer nanoseconds in, decisions out; no I/O, no threads, no pytest.
``gcra`` (the token bucket as two numbers), ``bucket`` (the shared bucket's state, a
throttle's pause and the rate learnt from it), ``windows`` ("N per window" limits),
``batches`` (batches, the barrier between them, failures and the stop), ``policy`` (the
policy's values and the parsing of durations, rates and limits), ``values`` and ``clock``.

Imports: nothing of this package outside ``limits``. Everything else builds on it.
"""
