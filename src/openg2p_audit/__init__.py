"""Serverless audit trail for OpenG2P: ingest → Kafka → writer → partitioned PostgreSQL."""

__version__ = "0.1.0"
