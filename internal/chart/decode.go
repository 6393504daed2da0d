package chart

import (
	"errors"
	"fmt"
	"maps"
	"slices"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	kjson "k8s.io/apimachinery/pkg/runtime/serializer/json"
	"sigs.k8s.io/yaml"
)

// Object is one rendered Kubernetes object.
type Object struct {
	Source string // the template that rendered it, e.g. tokenmgr/templates/deployment.yaml
	Kind   string
	Name   string
	YAML   string
	// Typed is the object decoded into its k8s.io/api type (a
	// *appsv1.Deployment...), or nil for the custom resources the chart
	// may render (a ServiceMonitor), which are in Unstructured only.
	Typed        runtime.Object
	Unstructured *unstructured.Unstructured
}

var (
	scheme = runtime.NewScheme()
	// strict refuses unknown fields, duplicate fields and fields in the
	// wrong case, as the API server's strict field validation does.
	strict = kjson.NewSerializerWithOptions(kjson.DefaultMetaFactory, scheme, scheme, kjson.SerializerOptions{Yaml: true, Strict: true})
)

func init() {
	for _, add := range []func(*runtime.Scheme) error{corev1.AddToScheme, appsv1.AddToScheme, policyv1.AddToScheme, networkingv1.AddToScheme} {
		if err := add(scheme); err != nil {
			panic(err)
		}
	}
}

// serviceMonitor is prometheus-operator's kind, checked without its types.
var serviceMonitor = schema.GroupVersionKind{Group: "monitoring.coreos.com", Version: "v1", Kind: "ServiceMonitor"}

// Decode decodes one manifest strictly: a kind of core/v1, apps/v1,
// policy/v1 or networking/v1 into its k8s.io/api type, refusing unknown,
// duplicate or miscased fields; a ServiceMonitor into an unstructured
// object whose required fields are checked. Any other kind is refused.
func Decode(manifest string) (*Object, error) {
	u := &unstructured.Unstructured{}
	if err := yaml.Unmarshal([]byte(manifest), &u.Object); err != nil {
		return nil, err
	}
	gvk := u.GroupVersionKind()
	obj := &Object{Kind: gvk.Kind, Name: u.GetName(), YAML: manifest, Unstructured: u}
	if obj.Name == "" {
		return nil, fmt.Errorf("%s without metadata.name", gvk.Kind)
	}
	if gvk == serviceMonitor {
		return obj, checkServiceMonitor(u)
	}
	if !scheme.Recognizes(gvk) {
		return nil, fmt.Errorf("%s %s: %s is not a kind this chart renders", gvk.Kind, obj.Name, gvk.GroupVersion())
	}
	typed, _, err := strict.Decode([]byte(manifest), nil, nil)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", gvk.Kind, obj.Name, err)
	}
	obj.Typed = typed
	return obj, nil
}

// checkServiceMonitor checks what prometheus-operator requires of a
// ServiceMonitor and what the chart sets: a label selector, and endpoints
// that each name a port, with only the endpoint fields the chart uses.
func checkServiceMonitor(u *unstructured.Unstructured) error {
	var errs []error
	for _, k := range sortedKeys(u.Object) {
		if !slices.Contains([]string{"apiVersion", "kind", "metadata", "spec"}, k) {
			errs = append(errs, fmt.Errorf("unknown field %q", k))
		}
	}
	spec, ok, err := unstructured.NestedMap(u.Object, "spec")
	if err != nil || !ok {
		return errors.Join(append(errs, errors.New("ServiceMonitor without spec"))...)
	}
	for _, k := range sortedKeys(spec) {
		if !slices.Contains([]string{"selector", "namespaceSelector", "endpoints", "jobLabel", "targetLabels", "podTargetLabels"}, k) {
			errs = append(errs, fmt.Errorf("unknown field spec.%s", k))
		}
	}
	if labels, ok, _ := unstructured.NestedStringMap(u.Object, "spec", "selector", "matchLabels"); !ok || len(labels) == 0 {
		errs = append(errs, errors.New("spec.selector.matchLabels: required"))
	}
	endpoints, ok, err := unstructured.NestedSlice(u.Object, "spec", "endpoints")
	if err != nil || !ok || len(endpoints) == 0 {
		errs = append(errs, errors.New("spec.endpoints: required"))
	}
	for i, e := range endpoints {
		ep, ok := e.(map[string]any)
		if !ok {
			errs = append(errs, fmt.Errorf("spec.endpoints[%d]: not an object", i))
			continue
		}
		for _, k := range sortedKeys(ep) {
			if !slices.Contains([]string{"port", "path", "scheme", "interval", "scrapeTimeout", "honorLabels", "relabelings", "metricRelabelings"}, k) {
				errs = append(errs, fmt.Errorf("unknown field spec.endpoints[%d].%s", i, k))
			}
		}
		if port, _ := ep["port"].(string); port == "" {
			errs = append(errs, fmt.Errorf("spec.endpoints[%d].port: required (the Service's port name)", i))
		}
	}
	return errors.Join(errs...)
}

func sortedKeys(m map[string]any) []string { return slices.Sorted(maps.Keys(m)) }

// Get returns the object of kind and name, or nil.
func (r *Release) Get(kind, name string) *Object {
	for _, o := range r.Objects {
		if o.Kind == kind && o.Name == name {
			return o
		}
	}
	return nil
}

// OfKind returns the objects of a kind, in the order Helm installs them.
func (r *Release) OfKind(kind string) []*Object {
	var out []*Object
	for _, o := range r.Objects {
		if o.Kind == kind {
			out = append(out, o)
		}
	}
	return out
}

// Deployments returns the rendered Deployments.
func (r *Release) Deployments() []*appsv1.Deployment {
	var out []*appsv1.Deployment
	for _, o := range r.OfKind("Deployment") {
		out = append(out, o.Typed.(*appsv1.Deployment))
	}
	return out
}
