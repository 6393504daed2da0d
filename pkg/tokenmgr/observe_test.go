package tokenmgr

import (
	"context"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

// The Manager's spans: a refresh with its lease wait, provider call and
// fenced write as children, a restore, and the 401 rule; their attributes
// carry no token.
func TestSpans(t *testing.T) {
	e := newEnv(t, miniredisBackend, tokenmgrtest.Strict)
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	t.Cleanup(func() { _ = tp.Shutdown(t.Context()) })
	m := e.manager(Strict, func(o *Options) { o.TracerProvider = tp })
	e.seed(m)
	if _, err := m.Rotate(t.Context(), e.grant); err != nil {
		t.Fatal(err)
	}
	// A 401 that the stored version cures.
	other := e.manager(Strict, nil)
	fail := 1
	api := &apiTransport{before: func() {
		if fail > 0 {
			fail--
			if _, err := other.Rotate(t.Context(), e.grant); err != nil {
				t.Error(err)
			}
		}
	}}
	if _, err := m.Token(t.Context(), e.grant); err != nil {
		t.Fatal(err)
	}
	resp, err := (&http.Client{Transport: m.Transport(e.grant, api)}).Get(e.idp.APIURL())
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	// The record is lost: restored.
	if err := e.client().Del(t.Context(), grantKeys("tm", e.grant).record).Err(); err != nil {
		t.Fatal(err)
	}
	if _, err := m.read(t.Context(), m.lookup(e.grant)); err != nil {
		t.Fatal(err)
	}

	spans := exp.GetSpans()
	byName := map[string][]tracetest.SpanStub{}
	for _, s := range spans {
		byName[s.Name] = append(byName[s.Name], s)
	}
	refresh := byName["tokenmgr.refresh"]
	if len(refresh) == 0 {
		t.Fatalf("no tokenmgr.refresh span among %d", len(spans))
	}
	for _, child := range []string{"tokenmgr.lease_wait", "tokenmgr.provider_call", "tokenmgr.write"} {
		found := false
		for _, s := range byName[child] {
			if s.Parent.SpanID() == refresh[0].SpanContext.SpanID() {
				found = true
			}
		}
		if !found {
			t.Errorf("no %s span under the first refresh", child)
		}
	}
	for _, name := range []string{"tokenmgr.unauthorized", "tokenmgr.restore"} {
		if len(byName[name]) == 0 {
			t.Errorf("no %s span", name)
		}
	}
	issued := e.idp.IssuedTokens()
	for _, s := range spans {
		for _, a := range s.Attributes {
			for _, tok := range issued {
				if strings.Contains(a.Value.Emit(), tok) {
					t.Errorf("span %s attribute %s carries a token", s.Name, a.Key)
				}
			}
		}
	}
}

type recordingObserver struct {
	mu     sync.Mutex
	calls  []string
	leases []bool
}

func (r *recordingObserver) ProviderCall(grant string, took time.Duration, outcome string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls = append(r.calls, outcome)
}

func (r *recordingObserver) LeaseWait(grant string, took time.Duration, acquired bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.leases = append(r.leases, acquired)
}

// The Observer hears every provider call with its outcome and every lease
// wait.
func TestObserver(t *testing.T) {
	e := newEnv(t, miniredisBackend, tokenmgrtest.Strict)
	obs := &recordingObserver{}
	m := e.manager(Strict, func(o *Options) { o.Observer = obs })
	e.seed(m)
	if _, err := m.Rotate(t.Context(), e.grant); err != nil {
		t.Fatal(err)
	}
	e.idp.Fail5xx(1)
	if _, err := m.Rotate(t.Context(), e.grant); err == nil {
		t.Fatal("Rotate through a 503 succeeded")
	}
	obs.mu.Lock()
	defer obs.mu.Unlock()
	if strings.Join(obs.calls, ",") != "ok,transient" || len(obs.leases) != 2 || !obs.leases[0] {
		t.Errorf("observed calls %v, leases %v; want ok then transient, two leases taken", obs.calls, obs.leases)
	}
}

// While the client secret rotates, the previous secret is tried once after
// invalid_client; it is counted and logged, and the refresh token is
// presented to the provider only once with each secret.
func testPreviousClientSecret(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Atlassian)
	good := e.manager(Atlassian, nil)
	e.seed(good)
	m := e.manager(Atlassian, func(o *Options) {
		cfg := *o.OAuth2
		o.PreviousClientSecret = cfg.ClientSecret // the provider still has the old one
		cfg.ClientSecret = "the-new-secret"
		o.OAuth2 = &cfg
	})
	e.clock.Advance(time.Hour)
	if _, err := m.Token(t.Context(), e.grant); err != nil {
		t.Fatalf("Token with the previous secret still current at the provider: %v", err)
	}
	if m.Stats().SecretFallbacks != 1 || !strings.Contains(e.logs.String(), "previous client secret") {
		t.Errorf("SecretFallbacks %d; the fallback must be counted and logged", m.Stats().SecretFallbacks)
	}
	if s := e.idp.Stats(); s.Rotations != 1 || s.ReuseDetected != 0 {
		t.Errorf("IdP %+v", s)
	}
}

// WithTimeout bounds a whole request through Client, the wait for a token
// included.
func TestClientWithTimeout(t *testing.T) {
	e := newEnv(t, miniredisBackend, tokenmgrtest.Strict)
	m := e.manager(Strict, nil)
	e.seed(m)
	e.idp.SetLatency(time.Second) // the refresh the request waits for is slow
	e.clock.Advance(time.Hour)
	client := m.Client(e.grant, WithTimeout(100*time.Millisecond))
	if client.Timeout != 100*time.Millisecond {
		t.Fatalf("Timeout %s", client.Timeout)
	}
	if _, err := client.Get(e.idp.APIURL()); err == nil {
		t.Error("a request that waited for a slow refresh succeeded within 100ms")
	}
	if m.Client(e.grant).Timeout != 0 {
		t.Error("the default client has a timeout")
	}
}

// spanRecorder is a slog.Handler that keeps the span of each record's
// context.
type spanRecorder struct {
	mu    sync.Mutex
	spans map[string]trace.SpanContext // message -> span
}

func (r *spanRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (r *spanRecorder) Handle(ctx context.Context, rec slog.Record) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.spans[rec.Message] = trace.SpanContextFromContext(ctx)
	return nil
}
func (r *spanRecorder) WithAttrs([]slog.Attr) slog.Handler { return r }
func (r *spanRecorder) WithGroup(string) slog.Handler      { return r }

// Log lines written during a refresh carry its span in their context, so a
// handler can add the trace id (internal/logging does).
func TestLogsCarryTheSpan(t *testing.T) {
	e := newEnv(t, miniredisBackend, tokenmgrtest.Strict)
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	t.Cleanup(func() { _ = tp.Shutdown(t.Context()) })
	rec := &spanRecorder{spans: map[string]trace.SpanContext{}}
	m := e.manager(Strict, func(o *Options) { o.TracerProvider = tp; o.Logger = slog.New(rec) })
	e.seed(m)
	e.idp.Fail5xx(1)
	if _, err := m.Rotate(t.Context(), e.grant); err == nil {
		t.Fatal("Rotate through a 503 succeeded")
	}
	rec.mu.Lock()
	sc := rec.spans["refresh failed; backing off"]
	rec.mu.Unlock()
	if !sc.IsValid() {
		t.Fatal("the backoff's log line has no span in its context")
	}
	for _, s := range exp.GetSpans() {
		if s.Name == "tokenmgr.refresh" && s.SpanContext.TraceID() == sc.TraceID() {
			return
		}
	}
	t.Errorf("the log line's trace %s is not the refresh's", sc.TraceID())
}
