package main

import (
	"fmt"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"

	eventingv1 "knative.dev/eventing/pkg/apis/eventing/v1"
	eventingv1alpha1 "knative.dev/eventing/pkg/apis/eventing/v1alpha1"
	sourcesv1 "knative.dev/eventing/pkg/apis/sources/v1"
	"knative.dev/eventing/pkg/auth"
	duckv1 "knative.dev/pkg/apis/duck/v1"
)

// Policy is what an EventPolicy names: the targets it guards and who may send to them.
type Policy struct {
	To   []PolicyRef `json:"to"`
	From []PolicyRef `json:"from"`
}

// PolicyRef is one entry of an EventPolicy's to[] or from[]: a reference (for from[], with
// the identity Knative resolves it to), a label selector, or a literal OIDC subject.
type PolicyRef struct {
	APIVersion string `json:"apiVersion,omitempty"`
	Kind       string `json:"kind,omitempty"`
	Name       string `json:"name,omitempty"`
	Namespace  string `json:"namespace,omitempty"`
	Selector   bool   `json:"selector,omitempty"`
	Sub        string `json:"sub,omitempty"`
	// Resolved: for a from[].ref to a Trigger, KafkaSource or PingSource, the subject its
	// tokens carry (pkg/auth/event_policy.go resolves a ref to the referent's
	// status.auth.serviceAccountName, which is this derived name).
	Resolved string `json:"resolved,omitempty"`
}

func init() {
	handlers["sources.knative.dev/v1/PingSource"] = validatePingSource
	handlers["eventing.knative.dev/v1/Trigger"] = validateTrigger
	handlers["eventing.knative.dev/v1/Broker"] = validateBroker
	handlers["eventing.knative.dev/v1alpha1/EventPolicy"] = validateEventPolicy
}

// gvks of the senders Knative gives an OIDC identity to, as their reconcilers name them:
// knative/eventing's PingSource and Trigger (MTChannelBasedBroker) reconcilers, and
// eventing-kafka-broker's control-plane/pkg/reconciler/source/source.go and
// trigger/trigger.go.
var senders = map[string]schema.GroupVersionKind{
	"PingSource":  sourcesv1.SchemeGroupVersion.WithKind("PingSource"),
	"Trigger":     eventingv1.SchemeGroupVersion.WithKind("Trigger"),
	"KafkaSource": schema.GroupVersionKind{Group: "sources.knative.dev", Version: "v1", Kind: "KafkaSource"},
}

// oidcSubject is the `sub` of the tokens the named resource sends (system:serviceaccount:
// NS:NAME, with NAME from auth.GetOIDCServiceAccountNameForResource).
func oidcSubject(kind, namespace, name string) string {
	gvk, ok := senders[kind]
	if !ok {
		return ""
	}
	meta := metav1.ObjectMeta{Name: name, Namespace: namespace}
	return fmt.Sprintf("system:serviceaccount:%s:%s", namespace, auth.GetOIDCServiceAccountNameForResource(gvk, meta))
}

func destination(role string, d *duckv1.Destination, parentNS string) []Destination {
	if d == nil || d.Ref == nil {
		return nil
	}
	out := Destination{
		Role: role, APIVersion: d.Ref.APIVersion, Kind: d.Ref.Kind, Name: d.Ref.Name,
		Namespace: namespaceOr(d.Ref.Namespace, parentNS),
	}
	if d.Audience != nil {
		out.Audience = *d.Audience
	}
	return []Destination{out}
}

func validatePingSource(env *Env, doc []byte, u *unstructured.Unstructured, obj *Object) {
	var ps *sourcesv1.PingSource
	for label, flags := range env.Eventing {
		ps = &sourcesv1.PingSource{}
		strict(doc, ps, obj)
		ctx := eventingCtx(flags)
		ps.SetDefaults(ctx)
		obj.Checks = append(obj.Checks, result(label, ps.Validate(ctx)))
	}
	obj.Decode = dedupe(obj.Decode)
	obj.Derived.OIDCSubject = oidcSubject("PingSource", u.GetNamespace(), u.GetName())
	obj.Derived.DeliversTo = destination("sink", &ps.Spec.Sink, u.GetNamespace())
}

func validateTrigger(env *Env, doc []byte, u *unstructured.Unstructured, obj *Object) {
	var t *eventingv1.Trigger
	for label, flags := range env.Eventing {
		t = &eventingv1.Trigger{}
		strict(doc, t, obj)
		ctx := eventingCtx(flags)
		t.SetDefaults(ctx)
		obj.Checks = append(obj.Checks, result(label, t.Validate(ctx)))
	}
	obj.Decode = dedupe(obj.Decode)
	obj.Derived.OIDCSubject = oidcSubject("Trigger", u.GetNamespace(), u.GetName())
	obj.Derived.DeliversTo = destination("subscriber", &t.Spec.Subscriber, u.GetNamespace())
	if t.Spec.Delivery != nil {
		obj.Derived.DeliversTo = append(obj.Derived.DeliversTo,
			destination("deadLetterSink", t.Spec.Delivery.DeadLetterSink, u.GetNamespace())...)
	}
}

func validateBroker(env *Env, doc []byte, u *unstructured.Unstructured, obj *Object) {
	for label, flags := range env.Eventing {
		b := &eventingv1.Broker{}
		strict(doc, b, obj)
		ctx := eventingCtx(flags)
		b.SetDefaults(ctx)
		obj.Checks = append(obj.Checks, result(label, b.Validate(ctx)))
	}
	obj.Decode = dedupe(obj.Decode)
	// eventing-kafka-broker control-plane/pkg/reconciler/broker/broker.go: the audience
	// the Broker's ingress requires of a token, with authentication-oidc on.
	obj.Derived.Audience = auth.GetAudience(eventingv1.SchemeGroupVersion.WithKind("Broker"), objectMeta(u))
}

func validateEventPolicy(env *Env, doc []byte, u *unstructured.Unstructured, obj *Object) {
	var ep *eventingv1alpha1.EventPolicy
	for label, flags := range env.Eventing {
		ep = &eventingv1alpha1.EventPolicy{}
		strict(doc, ep, obj)
		ctx := eventingCtx(flags)
		ep.SetDefaults(ctx)
		fe := ep.Validate(ctx)
		c := result(label, fe)
		// eventpolicy_validation.go refuses every EventPolicy on create while
		// authentication-oidc is off: that is Knative's rule, not a fault of the object.
		if errs := fe.WrappedErrors(); !flags.IsOIDCAuthentication() && len(errs) == 1 &&
			errs[0].Message == "oidc-authentication feature not enabled" && len(errs[0].Paths) == 0 {
			c.Expected = true
		}
		obj.Checks = append(obj.Checks, c)
	}
	obj.Decode = dedupe(obj.Decode)
	p := &Policy{To: []PolicyRef{}, From: []PolicyRef{}}
	for _, t := range ep.Spec.To {
		switch {
		case t.Ref != nil:
			p.To = append(p.To, PolicyRef{APIVersion: t.Ref.APIVersion, Kind: t.Ref.Kind, Name: t.Ref.Name, Namespace: u.GetNamespace()})
		case t.Selector != nil:
			p.To = append(p.To, PolicyRef{Selector: true})
		}
	}
	for _, f := range ep.Spec.From {
		switch {
		case f.Ref != nil:
			ns := namespaceOr(f.Ref.Namespace, u.GetNamespace())
			p.From = append(p.From, PolicyRef{
				APIVersion: f.Ref.APIVersion, Kind: f.Ref.Kind, Name: f.Ref.Name, Namespace: ns,
				Resolved: oidcSubject(f.Ref.Kind, ns, f.Ref.Name),
			})
		case f.Sub != nil:
			p.From = append(p.From, PolicyRef{Sub: *f.Sub})
		}
	}
	obj.Derived.Policy = p
}

func dedupe(in []string) []string {
	seen := map[string]bool{}
	out := []string{}
	for _, s := range in {
		if !seen[s] {
			seen[s] = true
			out = append(out, s)
		}
	}
	return out
}
