"""The concurrency cap (``--max-concurrency``): pools of slots, one per test in flight.

A test holds a slot from its admission to the end of its teardown. ``pool`` holds the
interface and the in-process pool; ``files`` the pool the workers of one pytest-xdist
session share; ``redis_pool`` the pool several sessions share through Redis. Pure logic,
no pytest: the scheduler takes a slot before a test's tokens and gives it back at its end.
"""
