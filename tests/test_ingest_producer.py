"""The producer's bookkeeping, with a fake Kafka producer (logic only; the real broker is
exercised in test_ingest and test_ingest_faults)."""

import asyncio
import threading

import pytest
from kafka.errors import IllegalStateError

from openg2p_audit.kafka_binding import KafkaRecord
from openg2p_audit.producer import EventProducer, Unavailable
from openg2p_audit.settings import load_settings

RECORD = KafkaRecord(key=b"k", value=b"{}", headers=[("ce_id", b"1")])


class NeverAcked:
    """A record future that the test resolves by hand."""

    def __init__(self):
        self.callbacks, self.errbacks = [], []

    def add_callback(self, fn):
        self.callbacks.append(fn)

    def add_errback(self, fn):
        self.errbacks.append(fn)


class KnownTopic:
    def partitions_for_topic(self, topic):
        return {0}


class FakeKafka:
    _metadata = KnownTopic()

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
        asyncio.run(producer.publish([RECORD] * 4))
    assert err.value.cause == "broker_unavailable" and producer.pending == 4
    with pytest.raises(Unavailable) as err:
        asyncio.run(producer.publish([RECORD] * 2))
    assert err.value.cause == "overloaded" and len(fake.futures) == 4
    for future in fake.futures:  # the broker finally answers (or the records expire)
        for callback in future.callbacks:
            callback(None)
    assert producer.pending == 0


def test_a_producer_that_refuses_to_send_is_replaced(producer):
    broken = producer._producer = FakeKafka(fail=IllegalStateError("producer closed"))
    with pytest.raises(Unavailable) as err:
        asyncio.run(producer.publish([RECORD]))
    assert err.value.cause == "broker_error"
    assert producer._producer is None and producer.pending == 0
    assert broken.closed.wait(5)


def test_a_request_whose_caller_left_still_counts_its_records(producer):
    """Cancelled while waiting (the client disconnected): the acks still reach the counts."""
    fake = producer._producer = FakeKafka()
    seen = []

    async def abandon():
        task = asyncio.create_task(
            producer.publish([RECORD] * 3, on_abandoned=lambda *c: seen.append(c))
        )
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        fake.futures[0].callbacks[0](None)  # from the sender thread, in real life
        fake.futures[1].errbacks[0](RuntimeError("expired"))
        assert seen == []  # one record has no outcome yet
        fake.futures[2].callbacks[0](None)
        await asyncio.sleep(0.01)

    producer.settings = producer.settings.model_copy(update={"ingest_ack_timeout_ms": 5000})
    producer.timeout = 5.0
    asyncio.run(abandon())
    assert seen == [(2, 1)]  # once every record has its outcome
    assert producer.pending == 0
