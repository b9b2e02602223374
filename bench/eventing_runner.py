"""How fast the local runner's KafkaSource delivers to a function that does nothing.

Starts a local Kafka, a 12-partition topic holding N binary CloudEvents, and a
runner with one KafkaSource (ordered, then unordered) to a functions-framework
function answering 202; reports records/s from the source's start until its
group has committed every offset. Usage: python bench/eventing_runner.py [N]
"""

from __future__ import annotations

import sys
import tempfile
import time
import uuid
from pathlib import Path

from kafka import KafkaProducer
from kafka.errors import KafkaError

from openg2p_audit.devservices import LocalKafka
from openg2p_audit.eventing.kafkasink import ensure_topic
from openg2p_audit.eventing.runner import Runner
from openg2p_audit.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from eventing_support import (  # the tests' manifest builders
    committed,
    config_map,
    kafka_source,
    service,
    write_manifests,
)


def _done(settings: Settings, group: str) -> int:
    try:
        return sum(committed(settings.bootstrap_servers, group).values())
    except KafkaError:  # the group coordinator of a fresh broker is still coming up
        return 0


def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, LocalKafka(Path(tmp) / "kafka") as kafka:
        settings = Settings(kafka_bootstrap_servers=kafka.bootstrap)
        topic = "bench.events"
        ensure_topic(settings.bootstrap_servers, topic, 12)
        producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", linger_ms=5)
        for i in range(n):
            headers = [("ce_specversion", b"1.0"), ("ce_id", str(uuid.uuid4()).encode()),
                       ("ce_source", b"bench"), ("ce_type", b"bench"),
                       ("content-type", b"application/json")]  # fmt: skip
            producer.send(topic, key=str(i % 500).encode(), value=b'{"n":%d}' % i, headers=headers)
        producer.flush()
        producer.close()
        for ordering in ("ordered", "unordered"):
            src = kafka_source("bench", settings, ordering=ordering, topics=[topic], dls=None)
            docs = [config_map(settings, Path(tmp) / "r", Path(tmp) / "p"),
                    service("recorder", target="accept"), src]  # fmt: skip
            directory = write_manifests(Path(tmp) / f"m-{ordering}", docs)
            group = src["spec"]["consumerGroup"]
            runner = Runner(directory, settings, workdir=Path(tmp) / ordering, commit_interval=0.5)
            try:
                runner.start()
                t0 = time.monotonic()
                while _done(settings, group) < n:
                    time.sleep(0.2)
                elapsed = time.monotonic() - t0
            finally:
                runner.stop()
            print(f"{ordering:9s} {n} records in {elapsed:.1f}s = {n / elapsed:,.0f} records/s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000)
