package main

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	commonpb "go.opentelemetry.io/proto/otlp/common/v1"

	"github.com/tokenmgr/tokenmgr/internal/testbin"
)

func attrValue(kvs []*commonpb.KeyValue, key string) string {
	for _, kv := range kvs {
		if kv.GetKey() == key {
			return kv.GetValue().GetStringValue()
		}
	}
	return ""
}

// The refresher binary exports OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is
// set: a scheduled refresh is one trace (refresher.scheduled_refresh over
// the Manager's tokenmgr.refresh, lease wait, provider call and write),
// from a resource naming the service and version, flushed at SIGTERM (the
// batch delay is set far beyond the test), and its log line carries the
// trace id. No token the IdP issued is in the exported bytes.
func TestRunExportsTraces(t *testing.T) {
	b := newBinEnv(t, "--profile", "strict")
	grantJSON, _ := b.newGrantJSON()
	var seed map[string]any
	_ = json.Unmarshal([]byte(grantJSON), &seed)
	seed["expires_in"] = 2 // due at once
	js, _ := json.Marshal(seed)
	if _, errOut, code := b.refresher(string(js), "seed", "--grant", "jira"); code != 0 {
		t.Fatalf("seed: %s", errOut)
	}
	// The binary's version, which may differ from this test's (a go build
	// can stamp VCS information that a test binary lacks).
	versionLine, _, _ := b.refresher("", "--version")
	binVersion := strings.Fields(versionLine + " ?")[1]
	rc := testbin.NewOTLPReceiver(t)
	cmd := exec.Command(filepath.Join(b.bin, "refresher"), "run", "--listen", "127.0.0.1:0", "--provider", "strict",
		"--token-url", b.idpURL+"/oauth/token", "--tick", "100ms", "--jitter", "0s")
	cmd.Env = append(b.env(), "OTEL_EXPORTER_OTLP_ENDPOINT="+rc.URL, "OTEL_BSP_SCHEDULE_DELAY=600000", "OTEL_SERVICE_NAME=", "OTEL_RESOURCE_ATTRIBUTES=")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill() }()
	var logs testbin.Buffer
	rotated := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			logs.Write(append(sc.Bytes(), '\n'))
			if strings.Contains(sc.Text(), `"msg":"grant pre-rotated"`) {
				select {
				case rotated <- sc.Text():
				default:
				}
			}
		}
	}()
	var line string
	select {
	case line = <-rotated:
	case <-time.After(30 * time.Second):
		t.Fatalf("no rotation logged:\n%s", logs.String())
	}
	if n := len(rc.Paths()); n != 0 {
		t.Fatalf("%d exports before shutdown with a 10-minute batch delay", n)
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("exit: %v\n%s", err, logs.String())
	}

	var logged map[string]any
	_ = json.Unmarshal([]byte(line), &logged)
	traceID, _ := logged["trace_id"].(string)
	if len(traceID) != 32 || logged["span_id"] == nil {
		t.Errorf("the rotation's log line has no trace id: %s", line)
	}
	names := map[string]string{} // span name -> trace id
	for _, req := range rc.Requests() {
		for _, rs := range req.GetResourceSpans() {
			res := rs.GetResource().GetAttributes()
			if attrValue(res, "service.name") != "refresher" || attrValue(res, "service.version") != binVersion {
				t.Errorf("resource %v, want service.name refresher, service.version %s", res, binVersion)
			}
			for _, ss := range rs.GetScopeSpans() {
				for _, s := range ss.GetSpans() {
					if _, seen := names[s.GetName()]; !seen || hex.EncodeToString(s.GetTraceId()) == traceID {
						names[s.GetName()] = hex.EncodeToString(s.GetTraceId())
					}
				}
			}
		}
	}
	for _, want := range []string{"refresher.scheduled_refresh", "tokenmgr.refresh", "tokenmgr.lease_wait", "tokenmgr.provider_call", "tokenmgr.write"} {
		if names[want] != traceID {
			t.Errorf("span %s: trace %q, want the logged rotation's %s (spans %v)", want, names[want], traceID, names)
		}
	}
	if p := rc.Paths(); len(p) == 0 || p[0] != "POST /v1/traces" {
		t.Errorf("requests %v", p)
	}
	resp, err := http.Get(b.idpURL + "/admin/issued")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var issued []string
	_ = json.NewDecoder(resp.Body).Decode(&issued)
	if len(issued) < 4 {
		t.Fatalf("the IdP issued %d tokens, want the seed's pair and the rotation's", len(issued))
	}
	exported := rc.Bodies()
	for _, tok := range issued {
		if bytes.Contains(exported, []byte(tok)) || strings.Contains(logs.String(), tok) {
			t.Errorf("an issued token is in the exported spans or the log")
		}
	}
}
