package main

import (
	"context"
	"strings"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"knative.dev/eventing/pkg/apis/feature"
	"knative.dev/pkg/apis"
	servingconfig "knative.dev/serving/pkg/apis/config"
)

// Env holds the configurations objects are checked under.
type Env struct {
	// Serving: the shipped config-defaults and config-autoscaler, and config-features with
	// the cluster's -serving-features applied.
	Serving *servingconfig.Config
	// Eventing: label -> config-features (the shipped defaults, and with OIDC on).
	Eventing map[string]feature.Flags
}

const (
	eventingDefaults = "eventing features=defaults"
	eventingOIDC     = "eventing features=authentication-oidc"
)

func newEnv(servingFeatures map[string]string) (*Env, error) {
	cfg := servingconfig.FromContextOrDefaults(context.Background())
	features, err := servingconfig.NewFeaturesConfigFromMap(servingFeatures)
	if err != nil {
		return nil, err
	}
	cfg.Features = features
	defaults, err := feature.NewFlagsConfigFromMap(map[string]string{})
	if err != nil {
		return nil, err
	}
	oidc := feature.Flags{}
	for k, v := range defaults {
		oidc[k] = v
	}
	oidc[feature.OIDCAuthentication] = feature.Enabled
	return &Env{Serving: cfg, Eventing: map[string]feature.Flags{eventingDefaults: defaults, eventingOIDC: oidc}}, nil
}

// servingCtx is the context a Serving webhook validates a create in.
func (e *Env) servingCtx() context.Context {
	return apis.WithinCreate(servingconfig.ToContext(context.Background(), e.Serving))
}

// eventingCtx is the context an Eventing webhook validates a create in, under flags.
func eventingCtx(flags feature.Flags) context.Context {
	return apis.WithinCreate(feature.ToContext(context.Background(), flags))
}

// result turns a Validate outcome into a Check, one line per message.
func result(label string, fe *apis.FieldError) Check {
	c := Check{Context: label, Errors: []string{}, Warnings: []string{}}
	if fe == nil {
		return c
	}
	for _, e := range fe.WrappedErrors() {
		// A message without a field path prints with a dangling ": ".
		text := strings.TrimSuffix(e.Error(), ": ")
		if e.Level == apis.WarningLevel {
			c.Warnings = append(c.Warnings, text)
		} else {
			c.Errors = append(c.Errors, text)
		}
	}
	if len(c.Errors) == 0 && len(c.Warnings) == 0 {
		c.Errors = append(c.Errors, fe.Error())
	}
	return c
}

func objectMeta(u *unstructured.Unstructured) metav1.ObjectMeta {
	return metav1.ObjectMeta{
		Name:        u.GetName(),
		Namespace:   u.GetNamespace(),
		Annotations: u.GetAnnotations(),
		Labels:      u.GetLabels(),
	}
}

// namespaceOr is a reference's namespace, defaulted to the referring object's as Knative
// defaults it.
func namespaceOr(ns, parent string) string {
	if ns == "" {
		return parent
	}
	return ns
}
