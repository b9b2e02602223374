package main

import (
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	autoscalingv1alpha1 "knative.dev/serving/pkg/apis/autoscaling/v1alpha1"
	servingv1 "knative.dev/serving/pkg/apis/serving/v1"
	deploymentconfig "knative.dev/serving/pkg/deployment"
	"knative.dev/serving/pkg/reconciler/autoscaling/resources"
)

// Revision is what Serving will do with a revision of the Service: the concurrency its
// autoscaler aims for per pod, the request timeout, and where its pods are placed.
type Revision struct {
	ContainerConcurrency int64 `json:"containerConcurrency"`
	// Total is the per-pod concurrency the target is taken of (the target annotation,
	// capped at containerConcurrency); Target = Total x Utilization is what the
	// autoscaler aims for.
	Total       float64 `json:"total"`
	Target      float64 `json:"target"`
	Utilization float64 `json:"utilization"`
	// TimeoutSeconds is the revision's request timeout; MaxRevisionTimeoutSeconds the
	// largest config-defaults allows.
	TimeoutSeconds            int64  `json:"timeoutSeconds"`
	MaxRevisionTimeoutSeconds int64  `json:"maxRevisionTimeoutSeconds"`
	MinScale                  string `json:"minScale,omitempty"`
	MaxScale                  string `json:"maxScale,omitempty"`
	// PodAntiAffinity is the affinity the revision reconciler gives the pods when the
	// Service sets none: config-deployment's default-affinity-type
	// (pkg/reconciler/revision/resources/deploy.go, makePreferSpreadRevisionOverNodes).
	PodAntiAffinity string `json:"podAntiAffinity"`
}

func init() {
	handlers["serving.knative.dev/v1/Service"] = validateService
}

func validateService(env *Env, doc []byte, _ *unstructured.Unstructured, obj *Object) {
	svc := &servingv1.Service{}
	strict(doc, svc, obj)
	ctx := env.servingCtx()
	svc.SetDefaults(ctx)
	obj.Checks = append(obj.Checks, result("serving", svc.Validate(ctx)))

	t := svc.Spec.Template
	for _, c := range t.Spec.Containers {
		for _, e := range c.Env {
			if e.Name == "FUNCTION_TARGET" {
				obj.Derived.FunctionTarget = e.Value
			}
		}
	}
	// The PodAutoscaler the revision reconciler makes carries the revision's annotations
	// and containerConcurrency; ResolveMetricTarget is what the autoscaler then aims for.
	pa := &autoscalingv1alpha1.PodAutoscaler{}
	pa.Annotations = map[string]string{}
	for k, v := range t.Annotations {
		pa.Annotations[k] = v
	}
	if _, ok := pa.Annotations["autoscaling.knative.dev/class"]; !ok {
		pa.Annotations["autoscaling.knative.dev/class"] = env.Serving.Autoscaler.PodAutoscalerClass
	}
	if t.Spec.ContainerConcurrency != nil {
		pa.Spec.ContainerConcurrency = *t.Spec.ContainerConcurrency
	}
	target, total := resources.ResolveMetricTarget(pa, env.Serving.Autoscaler)
	utilization := env.Serving.Autoscaler.ContainerConcurrencyTargetFraction
	if v, ok := pa.TargetUtilization(); ok {
		utilization = v
	}
	a := &Revision{
		ContainerConcurrency:      pa.Spec.ContainerConcurrency,
		Total:                     total,
		Target:                    target,
		Utilization:               utilization,
		MaxRevisionTimeoutSeconds: env.Serving.Defaults.MaxRevisionTimeoutSeconds,
		MinScale:                  t.Annotations["autoscaling.knative.dev/min-scale"],
		MaxScale:                  t.Annotations["autoscaling.knative.dev/max-scale"],
	}
	if t.Spec.TimeoutSeconds != nil {
		a.TimeoutSeconds = *t.Spec.TimeoutSeconds
	}
	// The shipped config-deployment (the queue-proxy image is the one key it requires).
	deployment, err := deploymentconfig.NewConfigFromMap(map[string]string{deploymentconfig.QueueSidecarImageKey: "queue-proxy"})
	switch {
	case err != nil:
		obj.Checks = append(obj.Checks, Check{Context: "config-deployment", Errors: []string{err.Error()}, Warnings: []string{}})
	case t.Spec.Affinity != nil:
		a.PodAntiAffinity = "the Service's own affinity"
	case deployment.DefaultAffinityType == deploymentconfig.PreferSpreadRevisionOverNodes:
		a.PodAntiAffinity = string(deploymentconfig.PreferSpreadRevisionOverNodes)
	default:
		a.PodAntiAffinity = "none"
	}
	obj.Derived.Revision = a
}
