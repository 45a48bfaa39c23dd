"""The API calls tests make, paced per host: the pacer and the clients' instrumentation.

``pacer`` admits one request to a host under its call limit (``limits.calls``), waits with
``time.sleep`` or ``await``, and decides whether a throttled request is sent again.
``http_client``, ``httpx`` and ``aiohttp`` patch each client library at its lowest public
layer that sees every request and its response; ``install`` applies and removes those
patches, importing no client library that the tests do not import themselves. No pytest.

Imports: ``throttle`` (its pure ``headers``), ``engine``, ``stores`` and ``limits``.
"""
