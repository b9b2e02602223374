"""A real single-node Apache Kafka broker (KRaft) for development and tests.

There is no Docker engine on the machines this project is developed and
tested on, so the broker runs from the official jars on Maven Central. Maven
resolves `kafka_2.13` and its dependencies once into a cache folder outside
the repository; later runs start straight from there.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from ._process import cache_dir, die_with_parent, free_port, stop_process, tail

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.1.1"
SCALA_VERSION = "2.13"
LOG4J_VERSION = "2.24.3"
HEAP = "-Xmx384m"

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>org.openg2p.audit</groupId><artifactId>local-kafka</artifactId><version>1</version>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId>
      <artifactId>kafka_{scala}</artifactId><version>{kafka}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId><version>{log4j}</version></dependency>
  </dependencies>
</project>
"""

_LOG4J = """status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = org.apache.kafka
logger.kafka.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
"""


class KafkaError(RuntimeError):
    pass


def kafka_libs() -> Path:
    """The folder of broker jars, fetched with Maven on first use."""
    libs = cache_dir() / f"kafka_{SCALA_VERSION}-{KAFKA_VERSION}" / "libs"
    marker = libs.parent / ".complete"
    if marker.exists():
        return libs
    libs.parent.mkdir(parents=True, exist_ok=True)
    with open(libs.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs may fetch at once
        if marker.exists():
            return libs
        mvn = shutil.which("mvn")
        if mvn is None:
            raise KafkaError("Maven (mvn) is needed to fetch the Kafka jars; install it first")
        if shutil.which("java") is None:
            raise KafkaError("Java 17+ is needed to run the Kafka broker; install it first")
        log.warning("fetching Apache Kafka %s jars with Maven into %s", KAFKA_VERSION, libs)
        shutil.rmtree(libs, ignore_errors=True)
        with tempfile.TemporaryDirectory() as tmp:
            pom = Path(tmp) / "pom.xml"
            pom.write_text(
                _POM.format(scala=SCALA_VERSION, kafka=KAFKA_VERSION, log4j=LOG4J_VERSION)
            )
            proc = subprocess.run(
                [mvn, "-B", "-q", "-f", str(pom), "dependency:copy-dependencies",
                 f"-DoutputDirectory={libs}", "-DincludeScope=runtime"],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if proc.returncode != 0:
                raise KafkaError(f"Maven could not fetch Kafka:\n{proc.stdout}\n{proc.stderr}")
        marker.write_text(KAFKA_VERSION)
    return libs


class LocalKafka:
    """One KRaft broker+controller on 127.0.0.1, with its own data folder.

    Ports stay fixed across stop()/start() so that clients (and fault tests)
    see the same broker come back.
    """

    def __init__(self, workdir: Path, port: int | None = None):
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.controller_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "server.log"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _java(self, libs: Path, main: str, *args: str, heap: str = "-Xmx128m") -> list[str]:
        return [
            "java", heap, "-XX:+UseSerialGC", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.workdir / 'log4j2.properties'}",
            "-cp", f"{libs}/*", main, *args,
        ]  # fmt: skip

    def _configure(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "log4j2.properties").write_text(_LOG4J.format(log=self.log_path))
        props = self.workdir / "server.properties"
        props.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
                    f"listeners=PLAINTEXT://127.0.0.1:{self.port},"
                    f"CONTROLLER://127.0.0.1:{self.controller_port}",
                    f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
                    "controller.listener.names=CONTROLLER",
                    "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                    "inter.broker.listener.name=PLAINTEXT",
                    f"log.dirs={self.workdir / 'data'}",
                    "num.partitions=1",
                    "auto.create.topics.enable=false",
                    "offsets.topic.replication.factor=1",
                    "offsets.topic.num.partitions=5",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "transaction.state.log.num.partitions=5",
                    "share.coordinator.state.topic.replication.factor=1",
                    "share.coordinator.state.topic.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    "num.network.threads=2",
                    "num.io.threads=4",
                    "",
                ]
            )
        )
        return props

    def start(self, timeout: float = 90.0) -> LocalKafka:
        libs = kafka_libs()
        props = self._configure()
        if not (self.workdir / "data" / "meta.properties").exists():
            cluster_id = uuid.uuid4().hex[:22]
            fmt = subprocess.run(
                self._java(libs, "kafka.tools.StorageTool", "format", "-t", cluster_id,
                           "-c", str(props), "--ignore-formatted"),
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if fmt.returncode != 0:
                raise KafkaError(f"formatting Kafka storage failed:\n{fmt.stdout}{fmt.stderr}")
        out = open(self.workdir / "stdout.log", "ab")  # noqa: SIM115 - lives as long as the broker
        self.proc = subprocess.Popen(
            self._java(libs, "kafka.Kafka", str(props), heap=HEAP),
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent(signal.SIGKILL), start_new_session=True,
        )  # fmt: skip
        out.close()
        self._wait_ready(timeout)
        log.info("Kafka %s ready on %s", KAFKA_VERSION, self.bootstrap)
        return self

    def _wait_ready(self, timeout: float) -> None:
        from kafka import KafkaAdminClient

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise KafkaError(
                    f"Kafka exited with {self.proc.returncode}:\n{tail(self.log_path)}\n"
                    f"{tail(self.workdir / 'stdout.log')}"
                )
            try:
                # A client that meets a closed port backs off for seconds; knock first.
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            except OSError as exc:
                last = exc
                time.sleep(0.2)
                continue
            try:
                admin = KafkaAdminClient(
                    bootstrap_servers=self.bootstrap,
                    request_timeout_ms=3000,
                    bootstrap_timeout_ms=3000,
                )
                try:
                    admin.describe_cluster()
                    return
                finally:
                    admin.close()
            except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
                last = exc
                time.sleep(0.5)
        self.stop()
        raise KafkaError(f"Kafka did not answer within {timeout}s ({last}):\n{tail(self.log_path)}")

    def stop(self, timeout: float = 30.0) -> None:
        stop_process(self.proc, signal.SIGTERM, timeout)
        self.proc = None

    def kill(self) -> None:
        stop_process(self.proc, signal.SIGKILL, 10)
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> LocalKafka:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.stop()
