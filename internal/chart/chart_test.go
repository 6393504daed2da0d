package chart

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	psapi "k8s.io/pod-security-admission/api"
	"k8s.io/pod-security-admission/policy"

	"helm.sh/helm/v3/pkg/lint/support"
)

// The two sets of values every test renders: the chart's defaults, and
// every optional part on.
var cases = []struct {
	name string
	opts Options
}{
	{"default values", Options{}},
	{"full values", Options{ValuesFiles: []string{FullValues}}},
}

func chartDir(t *testing.T) string {
	t.Helper()
	dir, err := Path()
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

func render(t *testing.T, o Options) *Release {
	t.Helper()
	rel, err := Render(chartDir(t), o)
	if err != nil {
		t.Fatal(err)
	}
	return rel
}

// helm lint --strict: no error and no warning (information is logged).
func TestChartLints(t *testing.T) {
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			msgs, err := Lint(chartDir(t), tc.opts, support.InfoSev)
			if err != nil {
				t.Fatal(err)
			}
			for _, m := range msgs {
				if m.Severity >= support.WarningSev {
					t.Errorf("lint: %s", m)
				} else {
					t.Logf("lint: %s", m)
				}
			}
		})
	}
}

// What each values set renders; every object decoded strictly (Render).
func TestChartRendersObjects(t *testing.T) {
	want := map[string][]string{
		"default values": {"Deployment/tokenmgr", "NetworkPolicy/tokenmgr", "PodDisruptionBudget/tokenmgr", "Service/tokenmgr", "ServiceAccount/tokenmgr"},
		"full values": {"ConfigMap/tokenmgr", "Deployment/tokenmgr", "Deployment/tokenmgr-worker", "NetworkPolicy/tokenmgr",
			"PodDisruptionBudget/tokenmgr", "Service/tokenmgr", "ServiceAccount/tokenmgr-refresher", "ServiceMonitor/tokenmgr"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			rel := render(t, tc.opts)
			var got []string
			for _, o := range rel.Objects {
				got = append(got, o.Kind+"/"+o.Name)
				if o.Kind == "Secret" {
					t.Errorf("%s: the chart takes Secrets by reference only", o.Source)
				}
			}
			slices.Sort(got)
			if !slices.Equal(got, want[tc.name]) {
				t.Errorf("got objects %v, want %v", got, want[tc.name])
			}
			if rel.Notes == "" {
				t.Error("no NOTES.txt")
			}
		})
	}
}

func refresher(t *testing.T, rel *Release) *appsv1.Deployment {
	t.Helper()
	o := rel.Get("Deployment", "tokenmgr")
	if o == nil {
		t.Fatal("no refresher Deployment")
	}
	return o.Typed.(*appsv1.Deployment)
}

// The refresher by default: two replicas (they coordinate by the lease),
// --listen on every interface, probes on its real endpoints.
func TestChartRefresherDefaults(t *testing.T) {
	rel := render(t, Options{})
	d := refresher(t, rel)
	if d.Spec.Replicas == nil || *d.Spec.Replicas != 2 {
		t.Errorf("replicas %v, want 2", d.Spec.Replicas)
	}
	c := d.Spec.Template.Spec.Containers[0]
	if !slices.Contains(c.Command, "--listen=:8080") {
		t.Errorf("command %v without --listen=:8080 (the default 127.0.0.1 is unreachable for the kubelet)", c.Command)
	}
	for _, p := range []struct {
		what  string
		probe *corev1.Probe
		path  string
	}{{"liveness", c.LivenessProbe, "/healthz"}, {"readiness", c.ReadinessProbe, "/readyz"}} {
		if p.probe == nil || p.probe.HTTPGet == nil {
			t.Errorf("no HTTP %s probe", p.what)
			continue
		}
		if p.probe.HTTPGet.Path != p.path {
			t.Errorf("%s probe on %s, want %s", p.what, p.probe.HTTPGet.Path, p.path)
		}
		if port, ok := containerPort(c, p.probe.HTTPGet.Port); !ok || port != 8080 {
			t.Errorf("%s probe on port %s: want the --listen port 8080", p.what, p.probe.HTTPGet.Port.String())
		}
	}
}

// Every pod passes the Pod Security Standards' restricted level (the
// admission plugin's own checks), runs with a read-only root filesystem,
// resource requests and a memory limit, and no API token.
func TestChartPodSecurity(t *testing.T) {
	eval, err := policy.NewEvaluator(policy.DefaultChecks(), nil)
	if err != nil {
		t.Fatal(err)
	}
	restricted := psapi.LevelVersion{Level: psapi.LevelRestricted, Version: psapi.LatestVersion()}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			for _, d := range render(t, tc.opts).Deployments() {
				pod := d.Spec.Template
				agg := policy.AggregateCheckResults(eval.EvaluatePod(restricted, &pod.ObjectMeta, &pod.Spec))
				if !agg.Allowed {
					t.Errorf("Deployment %s is not restricted: %s: %s", d.Name, agg.ForbiddenReason(), agg.ForbiddenDetail())
				}
				if a := pod.Spec.AutomountServiceAccountToken; a == nil || *a {
					t.Errorf("Deployment %s mounts a service account token", d.Name)
				}
				for _, c := range pod.Spec.Containers {
					if sc := c.SecurityContext; sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
						t.Errorf("Deployment %s container %s: root filesystem not read-only", d.Name, c.Name)
					}
					if c.Resources.Requests.Cpu().IsZero() || c.Resources.Requests.Memory().IsZero() || c.Resources.Limits.Memory().IsZero() {
						t.Errorf("Deployment %s container %s: resources %v, want CPU and memory requests and a memory limit", d.Name, c.Name, c.Resources)
					}
				}
			}
		})
	}
}

// Secret values reach the pods only through references.
func TestChartSecretsByReference(t *testing.T) {
	secret := []string{"TOKENMGR_CLIENT_SECRET", "TOKENMGR_ENCRYPTION_KEY", "TOKENMGR_REDIS_PASSWORD", "TOKENMGR_ADMIN_PASSWORD", "TOKENMGR_ADMIN_TOKEN"}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			rel := render(t, tc.opts)
			for _, c := range rel.Containers() {
				for _, e := range c.Env {
					if slices.Contains(secret, e.Name) && (e.ValueFrom == nil || e.ValueFrom.SecretKeyRef == nil) {
						t.Errorf("%s container %s: %s is not taken from a Secret", c.Workload, c.Name, e.Name)
					}
				}
			}
		})
	}
}

// The Service, the PodDisruptionBudget, the NetworkPolicy and the
// ServiceMonitor select the refresher's pods (not the worker's) and name
// ports those pods have.
func TestChartSelectorsAndPorts(t *testing.T) {
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			rel := render(t, tc.opts)
			d := refresher(t, rel)
			pods := labels.Set(d.Spec.Template.Labels)
			c := d.Spec.Template.Spec.Containers[0]
			var workers []labels.Set
			for _, w := range rel.Deployments() {
				if w.Name != d.Name {
					workers = append(workers, w.Spec.Template.Labels)
				}
			}
			selects := func(what string, sel *metav1.LabelSelector) {
				t.Helper()
				s, err := metav1.LabelSelectorAsSelector(sel)
				if err != nil || s.Empty() {
					t.Errorf("%s: selector %v: %v", what, sel, err)
					return
				}
				if !s.Matches(pods) {
					t.Errorf("%s: selector %s does not select the refresher's pods %v", what, s, pods)
				}
				for _, w := range workers {
					if s.Matches(w) {
						t.Errorf("%s: selector %s selects the worker's pods too", what, s)
					}
				}
			}
			if sel, err := metav1.LabelSelectorAsSelector(d.Spec.Selector); err != nil || !sel.Matches(pods) {
				t.Errorf("Deployment selector %v does not select its template's labels: %v", d.Spec.Selector, err)
			}

			svc := rel.Get("Service", "tokenmgr").Typed.(*corev1.Service)
			selects("Service", &metav1.LabelSelector{MatchLabels: svc.Spec.Selector})
			for _, p := range svc.Spec.Ports {
				if _, ok := containerPort(c, p.TargetPort); !ok {
					t.Errorf("Service port %s: target %s is not a port of the refresher", p.Name, p.TargetPort.String())
				}
			}
			if !slices.ContainsFunc(svc.Spec.Ports, func(p corev1.ServicePort) bool { return p.Name == "metrics" }) {
				t.Errorf("Service without the metrics port: %v", svc.Spec.Ports)
			}

			pdb := rel.Get("PodDisruptionBudget", "tokenmgr").Typed.(*policyv1.PodDisruptionBudget)
			selects("PodDisruptionBudget", pdb.Spec.Selector)

			np := rel.Get("NetworkPolicy", "tokenmgr").Typed.(*networkingv1.NetworkPolicy)
			selects("NetworkPolicy", &np.Spec.PodSelector)
			if !slices.Contains(np.Spec.PolicyTypes, networkingv1.PolicyTypeIngress) || !slices.Contains(np.Spec.PolicyTypes, networkingv1.PolicyTypeEgress) {
				t.Errorf("NetworkPolicy policyTypes %v: want Ingress and Egress", np.Spec.PolicyTypes)
			}
			var ingressPorts []int32
			for _, r := range np.Spec.Ingress {
				if len(r.Ports) == 0 {
					t.Errorf("NetworkPolicy ingress rule %v opens every port", r)
				}
				for _, p := range r.Ports {
					port, ok := containerPort(c, *p.Port)
					if !ok {
						t.Errorf("NetworkPolicy ingress port %s is not a port of the refresher", p.Port.String())
					}
					ingressPorts = append(ingressPorts, port)
				}
			}
			if want := containerPorts(c); !slices.Equal(ingressPorts, want) {
				t.Errorf("NetworkPolicy lets in ports %v, want exactly the refresher's %v", ingressPorts, want)
			}
			egressPorts := map[int32]bool{}
			for _, r := range np.Spec.Egress {
				for _, p := range r.Ports {
					egressPorts[p.Port.IntVal] = true
				}
			}
			for _, want := range []int32{53, 443} {
				if !egressPorts[want] {
					t.Errorf("NetworkPolicy egress without port %d: %v", want, np.Spec.Egress)
				}
			}

			if o := rel.Get("ServiceMonitor", "tokenmgr"); o != nil {
				var sel metav1.LabelSelector
				if m, _, _ := unstructured.NestedStringMap(o.Unstructured.Object, "spec", "selector", "matchLabels"); m != nil {
					sel.MatchLabels = m
				}
				s, _ := metav1.LabelSelectorAsSelector(&sel)
				if !s.Matches(labels.Set(svc.Labels)) {
					t.Errorf("ServiceMonitor selector %s does not select the Service %v", s, svc.Labels)
				}
				eps, _, _ := unstructured.NestedSlice(o.Unstructured.Object, "spec", "endpoints")
				for _, e := range eps {
					port := e.(map[string]any)["port"]
					if !slices.ContainsFunc(svc.Spec.Ports, func(p corev1.ServicePort) bool { return p.Name == port }) {
						t.Errorf("ServiceMonitor endpoint port %v is not a port of the Service", port)
					}
				}
			}
		})
	}
}

// containerPort resolves a port by number or name among c's ports.
func containerPort(c corev1.Container, p intstr.IntOrString) (int32, bool) {
	for _, cp := range c.Ports {
		if (p.Type == intstr.String && cp.Name == p.StrVal) || (p.Type == intstr.Int && cp.ContainerPort == p.IntVal) {
			return cp.ContainerPort, true
		}
	}
	return 0, false
}

func containerPorts(c corev1.Container) []int32 {
	var out []int32
	for _, cp := range c.Ports {
		out = append(out, cp.ContainerPort)
	}
	return out
}

// What the chart refuses: values its schema does not know (typos), and
// combinations that cannot work, with a message that says what to do.
func TestChartRefusesValues(t *testing.T) {
	for _, tc := range []struct {
		name   string
		values map[string]any
		want   string
	}{
		{"typo at the top", map[string]any{"refresherr": map[string]any{}}, "refresherr"},
		{"typo in refresher", map[string]any{"refresher": map[string]any{"replica": 3}}, "replica"},
		{"unknown provider", map[string]any{"refresher": map[string]any{"provider": "google"}}, "provider"},
		{"not a duration", map[string]any{"refresher": map[string]any{"refreshBefore": "ten minutes"}}, "refreshBefore"},
		{"secret value instead of a reference", map[string]any{"secrets": map[string]any{"clientSecret": "hunter2hunter2"}}, "clientSecret"},
		{"exposed dashboard without credentials", map[string]any{"admin": map[string]any{"enabled": true, "expose": true}}, "admin.expose needs credentials"},
		{"/connect without the dashboard", map[string]any{"refresher": map[string]any{"redirectURL": "https://r.example/callback"}}, "needs the operator surface"},
		{"both disruption budgets", map[string]any{"podDisruptionBudget": map[string]any{"minAvailable": 1}}, "not both"},
		{"worker without an API", map[string]any{"workerExample": map[string]any{"enabled": true, "grant": "g"}}, "workerExample.apiURL is required"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Render(chartDir(t), Options{Values: tc.values})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got error %v, want one containing %q", err, tc.want)
			}
		})
	}
}

const deployment = `apiVersion: apps/v1
kind: Deployment
metadata:
  name: d
spec:
  selector:
    matchLabels: {a: b}
  template:
    metadata:
      labels: {a: b}
    spec:
      containers:
        - name: c
          image: i
%s`

// Decode refuses what the API server's strict field validation refuses,
// and kinds the chart does not render.
func TestDecodeStrict(t *testing.T) {
	if _, err := Decode(fmt.Sprintf(deployment, "")); err != nil {
		t.Fatalf("a valid Deployment: %v", err)
	}
	for _, tc := range []struct{ name, manifest, want string }{
		{"unknown field", fmt.Sprintf(deployment, "          imagePolicy: Always\n"), `unknown field "spec.template.spec.containers[0].imagePolicy"`},
		{"miscased field", fmt.Sprintf(deployment, "          ImagePullPolicy: Always\n"), `unknown field "spec.template.spec.containers[0].ImagePullPolicy"`},
		{"duplicate field", fmt.Sprintf(deployment, "          image: j\n"), `key "image" already set`},
		{"wrong type", fmt.Sprintf(deployment, "          ports: 8080\n"), "ports"},
		{"unknown kind", "apiVersion: apps/v1\nkind: Deploymnet\nmetadata:\n  name: d\n", "not a kind this chart renders"},
		{"no name", "apiVersion: v1\nkind: Service\nmetadata: {}\n", "without metadata.name"},
		{"ServiceMonitor without selector", "apiVersion: monitoring.coreos.com/v1\nkind: ServiceMonitor\nmetadata:\n  name: m\nspec:\n  endpoints: [{port: metrics}]\n", "spec.selector.matchLabels: required"},
		{"ServiceMonitor endpoint typo", "apiVersion: monitoring.coreos.com/v1\nkind: ServiceMonitor\nmetadata:\n  name: m\nspec:\n  selector: {matchLabels: {a: b}}\n  endpoints: [{port: metrics, intervall: 5s}]\n", "spec.endpoints[0].intervall"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Decode(tc.manifest)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got error %v, want one containing %q", err, tc.want)
			}
		})
	}
}

func TestExpand(t *testing.T) {
	env := map[string]string{"PASS": "s3cret", "EMPTY": ""}
	for in, want := range map[string]string{
		"redis://:$(PASS)@h:6379": "redis://:s3cret@h:6379",
		"$(EMPTY)x":               "x",
		"$(UNSET)":                "$(UNSET)",
		"$$(PASS)":                "$(PASS)",
		"cost $5":                 "cost $5",
		"$(PASS":                  "$(PASS",
		"a$":                      "a$",
	} {
		if got := Expand(in, env); got != want {
			t.Errorf("Expand(%q) = %q, want %q", in, got, want)
		}
	}
}

// Env resolves references as the kubelet does, and MountFiles puts the
// mounted ConfigMap where a flag's rewritten path finds it.
func TestEnvAndMountFiles(t *testing.T) {
	rel := render(t, Options{ValuesFiles: []string{FullValues}})
	c := rel.ContainersRunning("refresher")[0]
	ex := Existing{
		Secrets: map[string]map[string]string{
			"tokenmgr-secrets": {"redis-password": "pw", "admin-password": "a", "admin-token": "t"},
			"tokenmgr-keys":    {"keyring": "k"},
			"jira-oauth":       {"client-secret": "j"},
			"xero-oauth":       {"client-secret": "x"},
		},
		ConfigMaps: map[string]map[string]string{"redis-ca": {"ca.crt": "PEM"}},
	}
	env, err := rel.Env(c, ex)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := env["TOKENMGR_REDIS_URL"], "rediss://default:pw@redis-master.data:6380/0"; got != want {
		t.Errorf("TOKENMGR_REDIS_URL %q, want %q", got, want)
	}
	delete(ex.Secrets, "xero-oauth")
	if _, err := rel.Env(c, ex); err == nil || !strings.Contains(err.Error(), "no key client-secret in Secret xero-oauth") {
		t.Errorf("a missing Secret: got error %v", err)
	}
	root := t.TempDir()
	local, err := rel.MountFiles(c, ex, root)
	if err != nil {
		t.Fatal(err)
	}
	flag := local("--config=/etc/tokenmgr/config/registrations.json")
	raw, err := os.ReadFile(strings.TrimPrefix(flag, "--config="))
	if err != nil {
		t.Fatal(err)
	}
	var doc struct{ Registrations []map[string]any }
	if err := json.Unmarshal(raw, &doc); err != nil || len(doc.Registrations) != 2 {
		t.Errorf("registrations.json: %v: %s", err, raw)
	}
	if got := local(env["TOKENMGR_REDIS_CA_FILE"]); got != filepath.Join(root, "/etc/tokenmgr/redis-ca/ca.crt") {
		t.Errorf("CA file rewritten to %q", got)
	}
	if got := local("--other=/etc/passwd"); got != "--other=/etc/passwd" {
		t.Errorf("a path outside the mounts rewritten to %q", got)
	}
}
