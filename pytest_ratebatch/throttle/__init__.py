"""Throttling by the server: recognised, waited for, retried and learnt from.

``detect`` recognises a throttle in a test's exception chain or in a response, by duck
typing (no client library imported); ``headers`` reads how long the server asks to wait and
what budget it says is left. Both are pure. ``retrying`` is the pytest side: it runs a test's
protocol, holds a throttled attempt back, pauses everyone sharing the bucket (whose
arithmetic lives in ``limits.bucket``) and runs the test again.

Imports: ``engine`` and ``limits`` (``retrying`` also pytest).
"""
