package telemetry

import (
	"context"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.opentelemetry.io/otel"
	collectortrace "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	"google.golang.org/grpc"

	"github.com/tokenmgr/tokenmgr/internal/buildinfo"
	"github.com/tokenmgr/tokenmgr/internal/testbin"
)

func envOf(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

// keepGlobals restores the otel globals that SetupTracing replaces.
func keepGlobals(t *testing.T) {
	tp, prop := otel.GetTracerProvider(), otel.GetTextMapPropagator()
	t.Cleanup(func() { otel.SetTracerProvider(tp); otel.SetTextMapPropagator(prop) })
}

func TestRegistry(t *testing.T) {
	reg := NewRegistry()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	have := map[string]bool{}
	for _, mf := range mfs {
		have[mf.GetName()] = true
	}
	for _, want := range []string{"tokenmgr_build_info", "go_goroutines", "go_memstats_alloc_bytes", "process_cpu_seconds_total", "process_open_fds"} {
		if !have[want] {
			t.Errorf("%s missing from the registry", want)
		}
	}
	if problems, err := testutil.GatherAndLint(reg); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %v", problems, err)
	}
}

// Nothing is set up, and the global provider is left alone, unless an
// endpoint is set; OTEL_SDK_DISABLED and OTEL_TRACES_EXPORTER=none turn
// it off even then.
func TestTracingOff(t *testing.T) {
	keepGlobals(t)
	before := otel.GetTracerProvider()
	for _, env := range []map[string]string{
		{},
		{EnvProtocol: "grpc"},
		{EnvEndpoint: "http://127.0.0.1:1", EnvSDKDisabled: "true"},
		{EnvTracesEndpoint: "http://127.0.0.1:1", EnvTracesExporter: "none"},
	} {
		tr, err := SetupTracing(t.Context(), "x", envOf(env), slog.New(slog.DiscardHandler))
		if err != nil || tr.Enabled() || tr.Shutdown(t.Context()) != nil {
			t.Errorf("%v: enabled %v, %v", env, tr != nil && tr.Enabled(), err)
		}
		if otel.GetTracerProvider() != before {
			t.Errorf("%v: the global tracer provider was replaced", env)
		}
	}
}

func TestTracingRefusesWhatItCannotSend(t *testing.T) {
	keepGlobals(t)
	for _, tc := range []struct {
		env  map[string]string
		want string
	}{
		{map[string]string{EnvEndpoint: "http://c:4318", EnvProtocol: "http/json"}, "http/protobuf or grpc"},
		{map[string]string{EnvEndpoint: "http://c:4318", EnvProtocol: "thrift"}, "want http/protobuf or grpc"},
		{map[string]string{EnvEndpoint: "collector:4318"}, EnvEndpoint + ": want an http:// or https:// URL"},
		{map[string]string{EnvTracesEndpoint: "://user:secret@x"}, EnvTracesEndpoint + ": want"},
		{map[string]string{EnvEndpoint: "http://c:4318", EnvTracesExporter: "zipkin"}, "only otlp and none"},
	} {
		_, err := SetupTracing(t.Context(), "x", envOf(tc.env), slog.New(slog.DiscardHandler))
		if err == nil || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "secret") {
			t.Errorf("%v: got %v, want an error with %q (and no URL in it)", tc.env, err, tc.want)
		}
	}
}

func attr(kvs []*commonpb.KeyValue, key string) string {
	for _, kv := range kvs {
		if kv.GetKey() == key {
			return kv.GetValue().GetStringValue()
		}
	}
	return ""
}

// checkExport asserts one span named op from service svc at this build's
// version.
func checkExport(t *testing.T, reqs []*collectortrace.ExportTraceServiceRequest, svc, op string) {
	t.Helper()
	var spans []string
	for _, req := range reqs {
		for _, rs := range req.GetResourceSpans() {
			res := rs.GetResource().GetAttributes()
			if attr(res, "service.name") != svc || attr(res, "service.version") != buildinfo.Version {
				t.Errorf("resource %v: want service.name %s and service.version %s", res, svc, buildinfo.Version)
			}
			for _, ss := range rs.GetScopeSpans() {
				for _, s := range ss.GetSpans() {
					spans = append(spans, s.GetName())
				}
			}
		}
	}
	if len(spans) != 1 || spans[0] != op {
		t.Errorf("spans %v, want [%s]", spans, op)
	}
}

// OTEL_EXPORTER_OTLP_ENDPOINT is a base URL: spans are POSTed to
// /v1/traces below it, as protobuf, and Shutdown flushes them (the batch
// processor would otherwise wait up to 5 s).
func TestTracingHTTP(t *testing.T) {
	keepGlobals(t)
	rc := testbin.NewOTLPReceiver(t)
	tr, err := SetupTracing(t.Context(), "svc-under-test", envOf(map[string]string{EnvEndpoint: rc.URL + "/base/"}), slog.New(slog.DiscardHandler))
	if err != nil || !tr.Enabled() {
		t.Fatalf("enabled %v, %v", tr != nil && tr.Enabled(), err)
	}
	if tr.Endpoint != rc.URL+"/base/v1/traces" || tr.Protocol != "http/protobuf" {
		t.Errorf("endpoint %s %s", tr.Endpoint, tr.Protocol)
	}
	if otel.GetTracerProvider() != tr.Provider {
		t.Error("not installed as the global tracer provider")
	}
	_, span := otel.Tracer("test").Start(t.Context(), "op")
	span.End()
	if err := tr.Shutdown(t.Context()); err != nil {
		t.Fatal(err)
	}
	if p := rc.Paths(); len(p) == 0 || p[0] != "POST /base/v1/traces" {
		t.Fatalf("requests %v, want POST /base/v1/traces", p)
	}
	checkExport(t, rc.Requests(), "svc-under-test", "op")
}

// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is used as it is.
func TestTracingTracesEndpoint(t *testing.T) {
	keepGlobals(t)
	rc := testbin.NewOTLPReceiver(t)
	tr, err := SetupTracing(t.Context(), "svc", envOf(map[string]string{EnvEndpoint: "http://127.0.0.1:1", EnvTracesEndpoint: rc.URL + "/custom"}), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	_, span := tr.Provider.Tracer("test").Start(t.Context(), "op")
	span.End()
	if err := tr.Shutdown(t.Context()); err != nil {
		t.Fatal(err)
	}
	if p := rc.Paths(); len(p) != 1 || p[0] != "POST /custom" {
		t.Errorf("requests %v, want POST /custom", p)
	}
}

type grpcReceiver struct {
	collectortrace.UnimplementedTraceServiceServer
	mu   sync.Mutex
	reqs []*collectortrace.ExportTraceServiceRequest
}

func (g *grpcReceiver) Export(_ context.Context, req *collectortrace.ExportTraceServiceRequest) (*collectortrace.ExportTraceServiceResponse, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.reqs = append(g.reqs, req)
	return &collectortrace.ExportTraceServiceResponse{}, nil
}

// OTEL_EXPORTER_OTLP_PROTOCOL=grpc sends over gRPC (plaintext for an
// http:// endpoint).
func TestTracingGRPC(t *testing.T) {
	keepGlobals(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	rc := &grpcReceiver{}
	collectortrace.RegisterTraceServiceServer(gs, rc)
	go func() { _ = gs.Serve(ln) }()
	t.Cleanup(gs.Stop)
	tr, err := SetupTracing(t.Context(), "svc-grpc", envOf(map[string]string{EnvEndpoint: "http://" + ln.Addr().String(), EnvProtocol: "grpc"}), slog.New(slog.DiscardHandler))
	if err != nil || tr.Protocol != "grpc" {
		t.Fatalf("%v %v", tr, err)
	}
	_, span := tr.Provider.Tracer("test").Start(t.Context(), "op")
	span.End()
	if err := tr.Shutdown(t.Context()); err != nil {
		t.Fatal(err)
	}
	rc.mu.Lock()
	defer rc.mu.Unlock()
	checkExport(t, rc.reqs, "svc-grpc", "op")
}

// Where spans go is logged by the services: a password in the URL is
// masked.
func TestTracingEndpointShownRedacted(t *testing.T) {
	keepGlobals(t)
	tr, err := SetupTracing(t.Context(), "svc", envOf(map[string]string{EnvEndpoint: "http://user:hunter2@127.0.0.1:1"}), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Shutdown(t.Context())
	if strings.Contains(tr.Endpoint, "hunter2") || !strings.HasSuffix(tr.Endpoint, "@127.0.0.1:1/v1/traces") {
		t.Errorf("Endpoint %q", tr.Endpoint)
	}
}
