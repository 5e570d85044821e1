"""The HTTP gateway: client apps' OTLP traces, fault reports and behaviour events into Kafka.

``app`` builds the aiohttp application from injected collaborators; ``ingest`` holds the
decisions (what consent allows, how a body decodes, which records to produce) and
``addresses`` who the caller is, both as pure functions; ``access`` which client app sent
a request (its API key) and whether that app is within its rate (``ratelimit``'s token
buckets); ``otlp_wire`` speaks OTLP/HTTP's protobuf and JSON encodings; ``producer``
bridges confluent-kafka's delivery callbacks to asyncio; ``status`` answers "what became
of my report?"; ``server`` runs it all until SIGINT/SIGTERM.
"""
