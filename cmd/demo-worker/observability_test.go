package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	"github.com/redis/go-redis/v9"
	"go.opentelemetry.io/otel"
	"golang.org/x/oauth2"

	"github.com/tokenmgr/tokenmgr/internal/buildinfo"
	"github.com/tokenmgr/tokenmgr/internal/cli"
	"github.com/tokenmgr/tokenmgr/internal/testbin"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

func TestVersion(t *testing.T) {
	var out bytes.Buffer
	// --version wins over flags that would not validate.
	if err := run(t.Context(), []string{"--version", "--concurrency", "0"}, noEnv, &out, io.Discard); err != nil || out.String() != buildinfo.String("demo-worker")+"\n" {
		t.Errorf("--version: %q %v", out.String(), err)
	}
	if _, err := parseFlags([]string{"--metrics-listen", "127.0.0.1:0"}, noEnv, io.Discard); err == nil || !strings.Contains(err.Error(), "not the embedded demo") {
		t.Errorf("--metrics-listen in the embedded demo: %v", err)
	}
	if _, err := parseFlags([]string{"--log-format", "xml"}, noEnv, io.Discard); err == nil || !strings.Contains(err.Error(), "--log-format") {
		t.Errorf("--log-format xml: %v", err)
	}
}

// A worker with --metrics-listen serves /metrics while it runs: build,
// Go and process metrics and the library's (tokenmgrprom), lint-clean.
// With --log-format json its log is JSON lines; it says a previous client
// secret is configured, and never prints it. With
// OTEL_EXPORTER_OTLP_ENDPOINT set it exports its refresh's spans as
// service demo-worker, flushed when it ends, without a token in them.
func TestWorkerMetricsAndLogs(t *testing.T) {
	mr := miniredis.RunT(t)
	idp := tokenmgrtest.NewServer(tokenmgrtest.Config{Profile: tokenmgrtest.Strict, AuthStyle: oauth2.AuthStyleInParams})
	t.Cleanup(idp.Close)
	key, _ := tokenmgr.GenerateKey("k1")
	keyring, _ := tokenmgr.NewKeyring(key)
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	t.Cleanup(func() { rdb.Close() })
	admin, err := tokenmgr.NewAdmin(tokenmgr.Options{Redis: rdb, Sealer: keyring, Provider: tokenmgr.Strict, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	expired := idp.NewGrant("")
	expired.Expiry = time.Now().Add(-time.Minute) // the worker refreshes at its first request
	if _, err := admin.Seed(t.Context(), "jira", expired, tokenmgr.SeedOptions{}); err != nil {
		t.Fatal(err)
	}
	// The API, through a door that tells when the first call went by:
	// the worker has refreshed by then.
	var once sync.Once
	apiCalled := make(chan struct{})
	api := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		idp.ServeHTTP(w, r)
		once.Do(func() { close(apiCalled) })
	}))
	t.Cleanup(api.Close)
	apiURL := api.URL + strings.TrimPrefix(idp.APIURL(), idp.URL)
	cfg := idp.OAuthConfig(oauth2.AuthStyleInParams)
	const previous = "the-previous-s3cret"
	rc := testbin.NewOTLPReceiver(t)
	keep := otel.GetTracerProvider()
	t.Cleanup(func() { otel.SetTracerProvider(keep) })
	env := map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": rc.URL, cli.EnvRedisURL: "redis://" + mr.Addr(), cli.EnvClientID: cfg.ClientID, cli.EnvClientSecret: cfg.ClientSecret,
		cli.EnvClientSecretPrevious: previous, cli.EnvEncryptionKey: key.Encode()}
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	pr, pw := io.Pipe()
	var stdout bytes.Buffer
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"--grant", "jira", "--provider", "strict", "--token-url", idp.TokenURL(), "--api-url", apiURL,
			"--concurrency", "1", "--duration", "1h", "--metrics-listen", "127.0.0.1:0", "--log-format", "json", "--log-level", "info", "--http-timeout", "3s"},
			func(k string) string { return env[k] }, &stdout, pw)
		pw.Close()
	}()
	var logs testbin.Buffer
	addr := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			logs.Write(append(sc.Bytes(), '\n'))
			if a, ok := strings.CutPrefix(sc.Text(), "demo-worker: metrics on "); ok {
				addr <- a
			}
		}
	}()
	var url string
	select {
	case url = <-addr:
	case err := <-done:
		t.Fatalf("the worker ended: %v\n%s", err, logs.String())
	}
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{"tokenmgr_build_info{", "go_goroutines ", "process_cpu_seconds_total ", "tokenmgr_provider_refreshes_total ",
		"tokenmgr_secret_fallbacks_total 0", `tokenmgr_provider_call_duration_seconds_count{outcome="ok"} `, `tokenmgr_lease_wait_duration_seconds_count{acquired="true"} `} {
		if !bytes.Contains(body, []byte(want)) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	if problems, err := promlint.New(bytes.NewReader(body)).Lint(); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %v", problems, err)
	}
	select {
	case <-apiCalled:
	case err := <-done:
		t.Fatalf("the worker ended before calling the API: %v\n%s", err, logs.String())
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("worker: %v\n%s", err, logs.String())
	}
	sawPrevious := false
	for _, line := range strings.Split(strings.TrimSpace(logs.String()), "\n") {
		if strings.HasPrefix(line, "demo-worker: metrics on ") {
			continue
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Errorf("--log-format json wrote a line that is not JSON: %q", line)
			continue
		}
		sawPrevious = sawPrevious || strings.Contains(m["msg"].(string), "previous client secret is configured")
	}
	if !sawPrevious {
		t.Errorf("the log does not say a previous client secret is configured:\n%s", logs.String())
	}
	if strings.Contains(logs.String()+stdout.String(), previous) {
		t.Errorf("the previous client secret was printed")
	}
	spans := map[string]bool{}
	for _, req := range rc.Requests() {
		for _, rs := range req.GetResourceSpans() {
			for _, kv := range rs.GetResource().GetAttributes() {
				if kv.GetKey() == "service.name" && kv.GetValue().GetStringValue() != "demo-worker" {
					t.Errorf("service.name %s", kv.GetValue().GetStringValue())
				}
			}
			for _, ss := range rs.GetScopeSpans() {
				for _, sp := range ss.GetSpans() {
					spans[sp.GetName()] = true
				}
			}
		}
	}
	if !spans["tokenmgr.refresh"] || !spans["tokenmgr.provider_call"] {
		t.Errorf("exported spans %v, want the refresh's", spans)
	}
	for _, tok := range idp.IssuedTokens() {
		if bytes.Contains(rc.Bodies(), []byte(tok)) || strings.Contains(logs.String(), tok) {
			t.Errorf("an issued token is in the exported spans or the log")
		}
	}
}

func TestBinaryVersion(t *testing.T) {
	bin, err := buildBinaries()
	if err != nil {
		t.Fatal(err)
	}
	// The built binary may record a VCS revision the test binary lacks:
	// compare the form, not the line.
	out, err := exec.Command(filepath.Join(bin, "demo-worker"), "--version").Output()
	if err != nil || !strings.HasPrefix(string(out), "demo-worker ") || !strings.Contains(string(out), " (revision ") {
		t.Errorf("demo-worker --version: %q %v", out, err)
	}
}
