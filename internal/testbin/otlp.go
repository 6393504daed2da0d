package testbin

import (
	"bytes"
	"compress/gzip"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"

	collectortrace "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	"google.golang.org/protobuf/proto"
)

// OTLPReceiver is an OTLP/HTTP trace receiver for tests: it keeps every
// request's path, raw body (after gzip, if sent so) and decoded spans.
type OTLPReceiver struct {
	URL string // the server's base URL, for OTEL_EXPORTER_OTLP_ENDPOINT

	mu       sync.Mutex
	paths    []string
	bodies   [][]byte
	requests []*collectortrace.ExportTraceServiceRequest
	// Got receives a value after each request is recorded.
	Got chan struct{}
}

// NewOTLPReceiver starts one on a loopback port, closed when the test ends.
func NewOTLPReceiver(t testing.TB) *OTLPReceiver {
	rc := &OTLPReceiver{Got: make(chan struct{}, 1000)}
	srv := httptest.NewServer(http.HandlerFunc(rc.serve))
	t.Cleanup(srv.Close)
	rc.URL = srv.URL
	return rc
}

func (rc *OTLPReceiver) serve(w http.ResponseWriter, r *http.Request) {
	var body io.Reader = r.Body
	if r.Header.Get("Content-Encoding") == "gzip" {
		zr, err := gzip.NewReader(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		body = zr
	}
	raw, err := io.ReadAll(body)
	req := &collectortrace.ExportTraceServiceRequest{}
	if err != nil || r.Header.Get("Content-Type") != "application/x-protobuf" || proto.Unmarshal(raw, req) != nil {
		http.Error(w, "want an ExportTraceServiceRequest in protobuf", http.StatusBadRequest)
		return
	}
	rc.mu.Lock()
	rc.paths = append(rc.paths, r.Method+" "+r.URL.Path)
	rc.bodies = append(rc.bodies, raw)
	rc.requests = append(rc.requests, req)
	rc.mu.Unlock()
	out, _ := proto.Marshal(&collectortrace.ExportTraceServiceResponse{})
	w.Header().Set("Content-Type", "application/x-protobuf")
	_, _ = w.Write(out)
	select {
	case rc.Got <- struct{}{}:
	default:
	}
}

// Paths are the requests' methods and paths, e.g. "POST /v1/traces".
func (rc *OTLPReceiver) Paths() []string {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return append([]string(nil), rc.paths...)
}

// Requests are the decoded requests.
func (rc *OTLPReceiver) Requests() []*collectortrace.ExportTraceServiceRequest {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return append([]*collectortrace.ExportTraceServiceRequest(nil), rc.requests...)
}

// Bodies is every request body, joined: to search for what must never be
// exported.
func (rc *OTLPReceiver) Bodies() []byte {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return bytes.Join(rc.bodies, []byte("\n"))
}
