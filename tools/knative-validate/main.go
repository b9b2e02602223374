// Command knative-validate checks the project's Knative manifests with Knative's own Go
// code, as a cluster's admission webhooks and controllers would see them, and prints what
// it found as one JSON document for tests/test_knative_validate.py to assert on.
//
// For every argument (a kustomization directory, rendered in-process with kustomize's
// krusty exactly as `kubectl kustomize DIR` renders it, or a multi-document YAML file) and
// every object in it:
//
//   - the object is decoded strictly into Knative's Go type (an unknown field is an error,
//     as the webhooks decode with DisallowUnknownFields), then SetDefaults and Validate run
//     under apis.WithinCreate, as the defaulting and validating webhooks run them on create;
//   - Serving objects are checked under Serving's shipped config-defaults, config-autoscaler
//     and config-features, with the -serving-features flags the cluster is said to enable;
//   - Eventing objects are checked twice: with the shipped config-features, and with
//     authentication-oidc enabled (what docs/deployment.md asks the cluster for);
//   - what the controllers derive from the objects is printed: the autoscaler's effective
//     concurrency target (Serving's ResolveMetricTarget), the OIDC identity Knative gives
//     each Trigger, KafkaSource and PingSource (auth.GetOIDCServiceAccountNameForResource,
//     the call eventing-kafka-broker's reconcilers make too), the OIDC audience of each
//     Broker and KafkaSink (auth.GetAudience), where each source delivers to, and the
//     subjects an EventPolicy names.
//
// KafkaSource and KafkaSink are not decoded here: their Go types live in
// knative.dev/eventing-kafka-broker, whose module the Go module proxy does not serve
// (tests/test_manifests.py checks them against their CRD schemas instead). Their identity
// and audience are still derived with eventing's own functions, from the fields read as
// plain YAML.
//
// Exit status: 0 when Knative's code accepted every object, 1 when it refused one, 2 when
// an argument could not be read or rendered.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"
)

// DefaultNamespace is where an object without a namespace is checked: the manifests name
// none, and `kubectl apply` without -n puts them in the current namespace, `default` unless
// the deployer says otherwise.
const DefaultNamespace = "default"

// Check is one run of Knative's SetDefaults and Validate under one configuration.
type Check struct {
	Context  string   `json:"context"`
	Errors   []string `json:"errors"`
	Warnings []string `json:"warnings"`
	// Expected is set when an error is the outcome Knative is known to give under this
	// context, and the test asserts it rather than treating it as a refusal (an EventPolicy
	// with authentication-oidc off).
	Expected bool `json:"expected,omitempty"`
}

// Destination is where a source or trigger sends events (its sink, subscriber or
// dead-letter sink), as a reference to one of the rendered objects.
type Destination struct {
	Role       string `json:"role"`
	APIVersion string `json:"apiVersion,omitempty"`
	Kind       string `json:"kind"`
	Name       string `json:"name"`
	Namespace  string `json:"namespace"`
	Audience   string `json:"audience,omitempty"`
}

// Object is what was found for one rendered object.
type Object struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Name       string `json:"name"`
	Namespace  string `json:"namespace"`
	// Checked says who judged the object: "knative" (its Go types, here), "crd-schema"
	// (only tests/test_manifests.py's CRD schemas: the eventing-kafka-broker kinds) or
	// "core" (a Kubernetes kind, checked by the API server's own schemas).
	Checked string   `json:"checked"`
	Why     string   `json:"why,omitempty"`
	Decode  []string `json:"decode"`
	Checks  []Check  `json:"checks"`
	Derived Derived  `json:"derived"`
}

// Derived holds the values Knative's controllers compute from an object.
type Derived struct {
	OIDCSubject    string            `json:"oidcSubject,omitempty"`
	Audience       string            `json:"audience,omitempty"`
	DeliversTo     []Destination     `json:"deliversTo,omitempty"`
	Revision       *Revision         `json:"revision,omitempty"`
	FunctionTarget string            `json:"functionTarget,omitempty"`
	Policy         *Policy           `json:"eventPolicy,omitempty"`
	Data           map[string]string `json:"data,omitempty"`
}

// Input is one argument and the objects it rendered to.
type Input struct {
	Path    string   `json:"path"`
	Error   string   `json:"error,omitempty"`
	Objects []Object `json:"objects"`
}

// Report is the whole output.
type Report struct {
	ServingFeatures map[string]string `json:"servingFeatures"`
	Refused         bool              `json:"refused"`
	Inputs          []Input           `json:"inputs"`
}

// A handler checks one document of one kind.
type handler func(env *Env, doc []byte, u *unstructured.Unstructured, obj *Object)

// handlers maps "apiVersion/Kind" to its check; serving.go, eventing.go and kafka.go add
// theirs in init.
var handlers = map[string]handler{}

// core kinds: the API server's, not Knative's (tests/test_manifests.py checks them against
// the Kubernetes schemas).
var core = map[string]bool{
	"v1/ConfigMap": true,
	"v1/Secret":    true,
	"batch/v1/Job": true,
}

type featureFlags map[string]string

func (f featureFlags) String() string { return fmt.Sprint(map[string]string(f)) }

func (f featureFlags) Set(v string) error {
	for _, kv := range strings.Split(v, ",") {
		k, val, ok := strings.Cut(strings.TrimSpace(kv), "=")
		if !ok || k == "" {
			return fmt.Errorf("expected key=value, got %q", kv)
		}
		f[k] = val
	}
	return nil
}

func main() {
	serving := featureFlags{}
	flag.Var(serving, "serving-features", "config-features keys of Knative Serving the cluster enables, as key=value[,key=value]")
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: knative-validate [-serving-features k=v,...] KUSTOMIZATION_DIR_OR_YAML_FILE...")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() == 0 {
		flag.Usage()
		os.Exit(2)
	}
	env, err := newEnv(serving)
	if err != nil {
		fmt.Fprintln(os.Stderr, "knative-validate:", err)
		os.Exit(2)
	}
	report := Report{ServingFeatures: serving, Inputs: []Input{}}
	status := 0
	for _, path := range flag.Args() {
		in := Input{Path: path, Objects: []Object{}}
		docs, err := load(path)
		if err != nil {
			in.Error = err.Error()
			status = 2
		}
		for _, doc := range docs {
			obj := check(env, doc)
			if refused(obj) {
				report.Refused = true
			}
			in.Objects = append(in.Objects, obj)
		}
		report.Inputs = append(report.Inputs, in)
	}
	if report.Refused && status == 0 {
		status = 1
	}
	out := json.NewEncoder(os.Stdout)
	out.SetIndent("", "  ")
	if err := out.Encode(report); err != nil {
		fmt.Fprintln(os.Stderr, "knative-validate:", err)
		os.Exit(2)
	}
	os.Exit(status)
}

// load renders a kustomization directory or reads a YAML file, split into documents.
func load(path string) ([][]byte, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	var data []byte
	if st.IsDir() {
		k := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
		m, err := k.Run(filesys.MakeFsOnDisk(), path)
		if err != nil {
			return nil, fmt.Errorf("kustomize: %w", err)
		}
		if data, err = m.AsYaml(); err != nil {
			return nil, err
		}
	} else if data, err = os.ReadFile(path); err != nil {
		return nil, err
	}
	var docs [][]byte
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	for {
		d, err := r.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, err
		}
		if t := bytes.TrimSpace(d); len(t) == 0 || string(t) == "---" {
			continue
		}
		docs = append(docs, d)
	}
	return docs, nil
}

func check(env *Env, doc []byte) Object {
	u := &unstructured.Unstructured{}
	if err := yaml.Unmarshal(doc, &u.Object); err != nil {
		return Object{Checked: "knative", Decode: []string{"not YAML: " + err.Error()}, Checks: []Check{}}
	}
	if u.GetNamespace() == "" {
		u.SetNamespace(DefaultNamespace)
		doc, _ = yaml.Marshal(u.Object)
	}
	key := u.GetAPIVersion() + "/" + u.GetKind()
	obj := Object{
		APIVersion: u.GetAPIVersion(), Kind: u.GetKind(), Name: u.GetName(), Namespace: u.GetNamespace(),
		Decode: []string{}, Checks: []Check{},
	}
	if core[key] {
		obj.Checked = "core"
		obj.Why = "a Kubernetes kind: the API server's schemas judge it, not Knative's code"
		if key == "v1/ConfigMap" {
			obj.Derived.Data = map[string]string{}
			data, _, _ := unstructured.NestedStringMap(u.Object, "data")
			for k, v := range data {
				obj.Derived.Data[k] = v
			}
		}
		return obj
	}
	h, ok := handlers[key]
	if !ok {
		obj.Checked = "none"
		obj.Why = "no Knative Go type for this kind in this build"
		return obj
	}
	obj.Checked = "knative"
	h(env, doc, u, &obj) // the Kafka kinds set Checked to "crd-schema"
	sort.Slice(obj.Checks, func(i, j int) bool { return obj.Checks[i].Context < obj.Checks[j].Context })
	return obj
}

// refused: Knative's code would not admit the object, or nothing could judge it.
func refused(obj Object) bool {
	if obj.Checked == "none" || len(obj.Decode) > 0 {
		return true
	}
	for _, c := range obj.Checks {
		if len(c.Errors) > 0 && !c.Expected {
			return true
		}
	}
	return false
}

// strict decodes doc into out as the webhooks do: an unknown field is an error. The
// object is then decoded leniently so that the remaining checks still run.
func strict(doc []byte, out interface{}, obj *Object) {
	if err := yaml.UnmarshalStrict(doc, out); err != nil {
		obj.Decode = append(obj.Decode, "strict decode: "+err.Error())
		if err := yaml.Unmarshal(doc, out); err != nil {
			obj.Decode = append(obj.Decode, "decode: "+err.Error())
		}
	}
}
