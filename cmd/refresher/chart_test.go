package main

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/alicebob/miniredis/v2"

	"github.com/tokenmgr/tokenmgr/internal/chart"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
)

// chartExisting is what the chart's values reference outside the release:
// the Secrets of the default and of the full values, and the CA ConfigMap.
func chartExisting(t *testing.T) chart.Existing {
	t.Helper()
	k, err := tokenmgr.GenerateKey("k1")
	if err != nil {
		t.Fatal(err)
	}
	key := k.Encode()
	return chart.Existing{
		Secrets: map[string]map[string]string{
			"tokenmgr":         {"client-id": "client-id", "client-secret": "client-secret", "encryption-keys": key},
			"tokenmgr-secrets": {"redis-password": "redis-password", "admin-password": "admin-password-1", "admin-token": "admin-token-12345"},
			"tokenmgr-keys":    {"keyring": key},
			"jira-oauth":       {"client-secret": "jira-secret"},
			"xero-oauth":       {"client-secret": "xero-secret"},
		},
		ConfigMaps: map[string]map[string]string{"redis-ca": {"ca.crt": "not read by the flag parser"}},
	}
}

var chartCases = []struct {
	name string
	opts chart.Options
}{
	{"default values", chart.Options{}},
	{"full values", chart.Options{ValuesFiles: []string{chart.FullValues}}},
	// The dashboard for kubectl port-forward, and /connect for one grant.
	{"one grant, dashboard on loopback", chart.Options{Values: map[string]any{
		"admin":     map[string]any{"enabled": true},
		"refresher": map[string]any{"grant": "jira-prod", "redirectURL": "http://localhost:8081/callback", "scopes": "read:jira-work"},
	}}},
}

// chartCommand is a rendered container's command line and environment
// as the kubelet would run it, with the files it mounts written under a
// temporary directory and their paths rewritten to point there.
func chartCommand(t *testing.T, rel *chart.Release, c chart.Container) ([]string, func(string) string) {
	t.Helper()
	ex := chartExisting(t)
	env, err := rel.Env(c, ex)
	if err != nil {
		t.Fatalf("%s: %v", c.Workload, err)
	}
	local, err := rel.MountFiles(c, ex, t.TempDir())
	if err != nil {
		t.Fatalf("%s: %v", c.Workload, err)
	}
	for k, v := range env {
		env[k] = local(v)
	}
	var args []string
	for _, a := range c.CommandLine(env) {
		if strings.Contains(a, "$(") {
			t.Errorf("%s: %q refers to a variable the container does not have", c.Workload, a)
		}
		args = append(args, local(a))
	}
	return args, func(k string) string { return env[k] }
}

// The Helm chart cannot run here: check that its refresher command
// parses with the flags this binary really has, listens where its probes,
// Service and NetworkPolicy look, and serves the registrations of
// --config.
func TestChartCommands(t *testing.T) {
	dir, err := chart.Path()
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range chartCases {
		t.Run(tc.name, func(t *testing.T) {
			rel, err := chart.Render(dir, tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			cs := rel.ContainersRunning("refresher")
			if len(cs) != 1 {
				t.Fatalf("%d refresher containers, want 1", len(cs))
			}
			c := cs[0]
			args, env := chartCommand(t, rel, c)
			if len(args) < 2 || args[1] != "run" {
				t.Fatalf("want 'refresher run ...', have %v", args)
			}
			cfg, err := parseRunFlags(args[2:], env, io.Discard)
			if err != nil {
				t.Fatalf("%v: %v", args, err)
			}
			ports := map[string]int{}
			for _, p := range c.Ports {
				ports[p.Name] = int(p.ContainerPort)
			}
			checkListen := func(flag, addr, portName string, loopback bool) {
				t.Helper()
				host, port, err := net.SplitHostPort(addr)
				if err != nil {
					t.Errorf("%s %q: %v", flag, addr, err)
					return
				}
				if loopback != isLoopback(addr) || (!loopback && host != "") {
					t.Errorf("%s %q: want %s", flag, addr, map[bool]string{true: "a loopback address", false: "every interface"}[loopback])
				}
				if portName != "" && port != strconv.Itoa(ports[portName]) {
					t.Errorf("%s %q: not the container port %s (%d)", flag, addr, portName, ports[portName])
				}
			}
			checkListen("--listen", cfg.listen, "metrics", false)
			if want := map[string]string{"full values": "text"}[tc.name]; want != "" && cfg.log.Format != want {
				t.Errorf("--log-format %q, want the values' %q", cfg.log.Format, want)
			}
			switch _, exposed := ports["admin"]; {
			case exposed:
				checkListen("--admin-listen", cfg.operatorListen, "admin", false)
			case cfg.operatorListen != "":
				checkListen("--admin-listen", cfg.operatorListen, "", true)
			}
			var regs []string
			wantLayout := map[string]string{"full values": "pair"}[tc.name]
			if wantLayout == "" {
				wantLayout = "hash"
			}
			for _, r := range cfg.regs {
				regs = append(regs, r.name)
				if r.common.Layout != wantLayout {
					t.Errorf("registration %s: --layout %q, want the values' %q", r.name, r.common.Layout, wantLayout)
				}
			}
			want := map[string][]string{"default values": {"default"}, "full values": {"jira", "xero"}, "one grant, dashboard on loopback": {"default"}}[tc.name]
			if !slices.Equal(regs, want) {
				t.Errorf("registrations %v, want %v", regs, want)
			}
		})
	}
}

// The refresher the default values describe answers its liveness and
// readiness probes: run it as the chart does (on a loopback port, with
// miniredis for Redis) and ask.
func TestChartProbesAnswer(t *testing.T) {
	dir, err := chart.Path()
	if err != nil {
		t.Fatal(err)
	}
	rel, err := chart.Render(dir, chart.Options{})
	if err != nil {
		t.Fatal(err)
	}
	c := rel.ContainersRunning("refresher")[0]
	args, env := chartCommand(t, rel, c)
	mr := miniredis.RunT(t)
	runEnv := func(k string) string {
		if k == "TOKENMGR_REDIS_URL" {
			return "redis://" + mr.Addr()
		}
		return env(k)
	}
	for i, a := range args {
		if strings.HasPrefix(a, "--listen=") {
			args[i] = "--listen=127.0.0.1:0" // never every interface in a test
		}
	}
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, args[1:], runEnv, strings.NewReader(""), pw, io.Discard)
		pw.Close()
	}()
	sc := bufio.NewScanner(pr)
	base := ""
	for base == "" && sc.Scan() {
		if _, url, ok := strings.Cut(sc.Text(), "http://"); ok {
			base = "http://" + url
		}
	}
	if base == "" {
		t.Fatalf("the refresher did not say where it listens: %v", <-done)
	}
	go func() { _, _ = io.Copy(io.Discard, pr) }()
	for _, p := range []struct {
		what string
		path string
	}{{"liveness", c.LivenessProbe.HTTPGet.Path}, {"readiness", c.ReadinessProbe.HTTPGet.Path}} {
		resp, err := http.Get(base + p.path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Errorf("%s probe GET %s: %s, want 200", p.what, p.path, resp.Status)
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("refresher run: %v", err)
	}
}
