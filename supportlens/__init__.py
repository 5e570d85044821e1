"""supportlens: Kafka-based support observability."""

__version__ = "0.1.0"
