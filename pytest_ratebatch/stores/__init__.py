"""Where shared state lives: one module per backend, each making ``limits``' arithmetic atomic.

``base`` holds the interfaces (``BucketStore``, ``Ledger``, ``SlotPool``) and ``StoreError``;
``memory`` serves the threads of one process, ``files`` the processes of one pytest-xdist
session (a directory of ``flock``-ed files), ``redis`` every session naming one Redis key.
A backend holds everything it shares: the bucket and its windows, the ledger, the slots.

Imports: ``limits`` only. No pytest. ``files`` and ``redis`` are loaded only by sessions
that use them (``redis`` imports redis-py, the ``redis`` extra).
"""
