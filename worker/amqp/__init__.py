"""The broker side: topology, consumer and publisher (the only aio-pika users)."""
