"""The OIDC identities Knative derives, pinned: a policy or an accepted subject that names
any other string would refuse every real delivery on a cluster."""

import pytest

from openg2p_audit.knative_identity import child_name, oidc_subject

# knative/pkg kmeta/names_test.go (TestChildName): upstream's own vectors, covering the
# plain case, the hashed parent, the hashed whole name padded with the suffix, and the
# trailing non-alphanumeric trimmed.
CHILD_NAME_VECTORS = [
    ("asdf", "-deployment", "asdf-deployment"),
    ("f" * 63, "-deployment", "ffffffffffffffffffff105d7597f637e83cc711605ac3ea4957-deployment"),
    ("f" * 63, "-deploy", "ffffffffffffffffffffffff105d7597f637e83cc711605ac3ea4957-deploy"),
    ("f" * 63, "f" * 63, "fffffffffffffffffffffffffffffff0502661254f13c89973cb3a83e0cbec0"),
    ("a", "f" * 63, "ab5cfd486935decbc0d305799f4ce4414ffffffffffffffffffffffffffffff"),
    ("b" * 32, "f" * 32, "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb329c7c81b9ab3ba71aa139066aa5625d"),
    ("aaaa", "b---a" * 20, "aaaa7a3f7966594e3f0849720eced8212c18b---ab---ab---ab---ab---ab"),
    (
        "a" * 17,
        "a.-.-.-.-.-.-.aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "aaaaaaaaaaaaaaaaaa1eb10dc911444f8434af83b7225442da",
    ),
]


@pytest.mark.parametrize(("parent", "suffix", "want"), CHILD_NAME_VECTORS)
def test_child_name_matches_knative_pkg(parent, suffix, want):
    assert child_name(parent, suffix) == want


def test_the_identities_of_our_resources_are_the_ones_knative_prints():
    # Printed by knative/eventing v0.50.0's auth.GetOIDCServiceAccountNameForResource
    # for the manifests in knative/base (namespace default).
    assert (
        oidc_subject("default", "Trigger", "audit-to-ingest")
        == "system:serviceaccount:default:audit-to-ingest-oidc-eventing.knative.dev-trigger"
    )
    assert (
        oidc_subject("default", "KafkaSource", "audit-events-to-writer")
        == "system:serviceaccount:default:"
        "audit-events-to-writer-oidc-sources.knative.dev-kafkasource"
    )
    assert (
        oidc_subject("default", "PingSource", "audit-maintenance-hourly")
        == "system:serviceaccount:default:"
        "audit-maintenance-hourly-oidc-sources.knative.dev-pingsource"
    )


def test_a_long_name_is_hashed_as_knative_hashes_it():
    name = "a-very-long-kafkasource-name-for-the-audit-events"
    account = oidc_subject("ns", "KafkaSource", name).rsplit(":", 1)[1]
    assert len(account) <= 63
    assert account == child_name(name, "-oidc-sources.knative.dev-KafkaSource").lower()
    assert account.endswith("-oidc-sources.knative.dev-kafkasource") is False


def test_an_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="no OIDC identity"):
        oidc_subject("default", "Deployment", "x")
