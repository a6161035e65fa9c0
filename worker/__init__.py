"""transform-worker: runs GOBL document workflows from RabbitMQ commands."""
