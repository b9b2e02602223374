"""`openg2p-audit-emit` in process, against a fake ingest or a closed port."""

from __future__ import annotations

import io
import json

from openg2p_audit_client.cli import main

from .fake_ingest import FakeIngest, free_port


def lines(n: int, **data) -> io.StringIO:
    events = [
        {
            "source": "/openg2p/registry",
            "type": "org.openg2p.registry.beneficiary.viewed",
            "subject": f"beneficiary/BEN-{i}",
            "data": {"actor": {"id": "officer-17"}, "action": "view", "outcome": "success", **data},
        }
        for i in range(n)
    ]
    return io.StringIO("\n".join(json.dumps(e) for e in events) + "\n\n")


def test_closed_port_queues_then_flush_only_delivers(tmp_path, capsys):
    outbox = str(tmp_path / "q.db")
    closed = f"http://127.0.0.1:{free_port()}/"
    argv = ["--url", closed, "--token", "T", "--outbox", outbox, "--timeout", "0.5"]
    assert main(argv, lines(7)) == 0
    assert capsys.readouterr().out.strip() == "0 accepted, 7 queued, 0 rejected"
    fake = FakeIngest().start()
    try:
        argv = ["--url", fake.url, "--token", "T", "--outbox", outbox, "--flush-only"]
        assert main(argv, io.StringIO("ignored")) == 0
        assert capsys.readouterr().out.strip() == "7 accepted, 0 queued, 0 rejected"
        assert len(set(fake.accepted_ids())) == 7
    finally:
        fake.stop()


def test_invalid_lines_and_refused_events_count_as_rejected(ingest, capsys):
    ingest.answers.append(
        (400, {"error": "invalid events", "problems": [{"index": 0, "reason": "schema"}]}, {})
    )
    stdin = io.StringIO(lines(3).getvalue() + "not json\n" + '{"source": "/s"}\n')
    assert main(["--url", ingest.url, "--token", "T"], stdin) == 1
    captured = capsys.readouterr()
    assert captured.out.strip() == "2 accepted, 0 queued, 3 rejected"
    assert "line 5: rejected: not JSON" in captured.err
    assert "line 6: rejected:" in captured.err and "data: is required" in captured.err


def test_without_an_outbox_undelivered_events_fail_the_run(capsys):
    closed = f"http://127.0.0.1:{free_port()}/"
    assert main(["--url", closed, "--timeout", "0.3"], lines(2)) == 1
    captured = capsys.readouterr()
    assert captured.out.strip() == "0 accepted, 0 queued, 0 rejected"
    assert "2 event(s) not delivered" in captured.err


def test_usage_errors(capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_:
        main(["--url", "http://x/", "--flush-only"], io.StringIO())
    assert exit_.value.code == 2
    with pytest.raises(SystemExit):
        main(["--url", "http://x/", "--token", "a", "--token-file", "f"], io.StringIO())
    assert main(["--url", "ftp://x/"], io.StringIO()) == 2
