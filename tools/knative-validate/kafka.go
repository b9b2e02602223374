package main

import (
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"knative.dev/eventing/pkg/auth"
)

// The eventing-kafka-broker kinds. Their Go types (and their SetDefaults and Validate) are
// in knative.dev/eventing-kafka-broker, a module the Go module proxy refuses to serve here,
// so Knative's code does not judge them: tests/test_manifests.py validates them against
// their CRD schemas (tests/schemas/knative). What Knative derives from them comes from
// eventing's own functions, which eventing-kafka-broker's reconcilers call with these
// GroupVersionKinds (control-plane/pkg/reconciler/source/source.go, sink/kafka_sink.go).

func init() {
	handlers["sources.knative.dev/v1/KafkaSource"] = deriveKafkaSource
	handlers["eventing.knative.dev/v1alpha1/KafkaSink"] = deriveKafkaSink
}

const kafkaWhy = "eventing-kafka-broker's Go module is not served by the Go module proxy: checked against its CRD schema by tests/test_manifests.py"

func refAt(u *unstructured.Unstructured, role string, path ...string) []Destination {
	ref, found, _ := unstructured.NestedStringMap(u.Object, append(path, "ref")...)
	if !found {
		return nil
	}
	d := Destination{
		Role: role, APIVersion: ref["apiVersion"], Kind: ref["kind"], Name: ref["name"],
		Namespace: namespaceOr(ref["namespace"], u.GetNamespace()),
	}
	d.Audience, _, _ = unstructured.NestedString(u.Object, append(path, "audience")...)
	return []Destination{d}
}

func deriveKafkaSource(_ *Env, _ []byte, u *unstructured.Unstructured, obj *Object) {
	obj.Checked, obj.Why = "crd-schema", kafkaWhy
	obj.Derived.OIDCSubject = oidcSubject("KafkaSource", u.GetNamespace(), u.GetName())
	obj.Derived.DeliversTo = append(refAt(u, "sink", "spec", "sink"),
		refAt(u, "deadLetterSink", "spec", "delivery", "deadLetterSink")...)
}

func deriveKafkaSink(_ *Env, _ []byte, u *unstructured.Unstructured, obj *Object) {
	obj.Checked, obj.Why = "crd-schema", kafkaWhy
	gvk := schema.GroupVersionKind{Group: "eventing.knative.dev", Version: "v1alpha1", Kind: "KafkaSink"}
	obj.Derived.Audience = auth.GetAudience(gvk, objectMeta(u))
}
