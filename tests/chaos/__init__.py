"""Resilience tests: kill -9, broker outages, store outages, poison commands, shutdown.

They run real ``transform-worker run`` subprocesses against the broker named by
``TRANSFORM_TEST_AMQP_URL`` and disturb the RabbitMQ node named by
``TRANSFORM_TEST_RABBITMQ_NODE``. Point both at a private node while other test runs
share the default one, because these tests close its connections and stop it.
"""
