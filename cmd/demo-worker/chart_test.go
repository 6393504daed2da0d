package main

import (
	"io"
	"strings"
	"testing"

	"github.com/tokenmgr/tokenmgr/internal/chart"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
)

// The Helm chart cannot run here: check that the example worker it
// renders (workerExample, off by default) parses with the flags this
// binary really has, and is a worker, not the embedded demo.
func TestChartCommands(t *testing.T) {
	dir, err := chart.Path()
	if err != nil {
		t.Fatal(err)
	}
	k, err := tokenmgr.GenerateKey("k1")
	if err != nil {
		t.Fatal(err)
	}
	ex := chart.Existing{
		Secrets: map[string]map[string]string{
			"tokenmgr":         {"client-id": "client-id", "client-secret": "client-secret", "encryption-keys": k.Encode()},
			"tokenmgr-secrets": {"redis-password": "redis-password"},
			"tokenmgr-keys":    {"keyring": k.Encode()},
			"jira-oauth":       {"client-secret": "jira-secret"},
		},
		ConfigMaps: map[string]map[string]string{"redis-ca": {"ca.crt": "not read by the flag parser"}},
	}
	for _, tc := range []struct {
		name    string
		opts    chart.Options
		workers int
	}{
		{"default values", chart.Options{}, 0},
		{"full values", chart.Options{ValuesFiles: []string{chart.FullValues}}, 1},
		{"worker on default values", chart.Options{Values: map[string]any{"workerExample": map[string]any{
			"enabled": true, "grant": "jira-prod", "apiURL": "https://api.atlassian.com/ex/jira/CLOUD_ID/rest/api/3/myself"}}}, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rel, err := chart.Render(dir, tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			cs := rel.ContainersRunning("demo-worker")
			if len(cs) != tc.workers {
				t.Fatalf("%d demo-worker containers, want %d", len(cs), tc.workers)
			}
			for _, c := range cs {
				env, err := rel.Env(c, ex)
				if err != nil {
					t.Fatalf("%s: %v", c.Workload, err)
				}
				args := c.CommandLine(env)
				for _, a := range args {
					if strings.Contains(a, "$(") {
						t.Errorf("%s: %q refers to a variable the container does not have", c.Workload, a)
					}
				}
				cfg, err := parseFlags(args[1:], func(k string) string { return env[k] }, io.Discard)
				if err != nil {
					t.Errorf("%s %v: %v", c.Workload, args, err)
					continue
				}
				if tc.name == "full values" && cfg.log.Format != "json" {
					t.Errorf("%s: --log-format %q, want the values' json", c.Workload, cfg.log.Format)
				}
				if want := map[bool]string{true: "pair", false: "hash"}[tc.name == "full values"]; cfg.common.Layout != want {
					t.Errorf("%s: --layout %q, want the values' %q", c.Workload, cfg.common.Layout, want)
				}
				if cfg.embedded() {
					t.Errorf("%s would run the embedded demo, not a worker", c.Workload)
				}
			}
		})
	}
}
