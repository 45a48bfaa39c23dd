"""What admits a start: ``limiter.RateLimiter`` (reserve tokens atomically, then sleep until
the reserved moment) and ``scheduler.TaskScheduler`` (per test: the stop conditions, the
batch and its barrier, a concurrency slot, then the tokens; or a cancellation).

Imports: ``stores`` and ``limits``. Knows nothing of pytest: a task is anything with a cost.
"""
