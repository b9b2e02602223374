"""The producer's bookkeeping, with a fake Kafka producer (logic only; the real broker is
exercised in test_ingest and test_ingest_faults)."""

import threading

import pytest
from kafka.errors import IllegalStateError, KafkaTimeoutError

from openg2p_audit.kafka_binding import KafkaRecord
from openg2p_audit.producer import EventProducer, Unavailable
from openg2p_audit.settings import load_settings

RECORD = KafkaRecord(key=b"k", value=b"{}", headers=[("ce_id", b"1")])


class NeverAcked:
    def __init__(self):
        self.callbacks = []

    def add_both(self, fn):
        self.callbacks.append(fn)

    def get(self, timeout):
        raise KafkaTimeoutError("no ack")


class FakeKafka:
    def __init__(self, fail=None):
        self.fail, self.futures, self.closed = fail, [], threading.Event()

    def send(self, topic, value, key, headers):
        if self.fail:
            raise self.fail
        self.futures.append(NeverAcked())
        return self.futures[-1]

    def close(self, timeout=None):
        self.closed.set()


@pytest.fixture
def producer():
    settings = load_settings(
        kafka_bootstrap_servers="127.0.0.1:9", ingest_ack_timeout_ms=50,
        ingest_max_pending_events=5,
    )  # fmt: skip
    ep = EventProducer(settings)
    yield ep
    ep._probe_pool.shutdown(wait=False)


def test_unacknowledged_records_count_against_the_bound_until_they_resolve(producer):
    fake = producer._producer = FakeKafka()
    with pytest.raises(Unavailable) as err:
        producer.publish([RECORD] * 4)
    assert err.value.cause == "broker_unavailable" and producer.pending == 4
    with pytest.raises(Unavailable) as err:
        producer.publish([RECORD] * 2)
    assert err.value.cause == "overloaded" and len(fake.futures) == 4
    for future in fake.futures:  # the broker finally answers (or the records expire)
        for callback in future.callbacks:
            callback(None)
    assert producer.pending == 0


def test_a_producer_that_refuses_to_send_is_replaced(producer):
    broken = producer._producer = FakeKafka(fail=IllegalStateError("producer closed"))
    with pytest.raises(Unavailable) as err:
        producer.publish([RECORD])
    assert err.value.cause == "broker_error"
    assert producer._producer is None and producer.pending == 0
    assert broken.closed.wait(5)
