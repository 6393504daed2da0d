package tokenmgr

import (
	"context"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
)

// Observer receives the Manager's timings as they happen, for metrics;
// package tokenmgrprom has one for Prometheus. Its methods must be safe for
// concurrent use and must not block. Nothing passed to it is secret.
type Observer interface {
	// ProviderCall reports one call to the token endpoint: how long it
	// took and its outcome, "ok", "transient", "refused" (invalid_grant)
	// or "config" (the client was rejected).
	ProviderCall(grant string, took time.Duration, outcome string)
	// LeaseWait reports how long a refresh waited for the grant's lease,
	// and whether it got it (false: another holder rotated meanwhile, or
	// the wait ran out).
	LeaseWait(grant string, took time.Duration, acquired bool)
}

type noObserver struct{}

func (noObserver) ProviderCall(string, time.Duration, string) {}
func (noObserver) LeaseWait(string, time.Duration, bool)      {}

// tracerName is the instrumentation scope of the Manager's spans.
const tracerName = "github.com/tokenmgr/tokenmgr/pkg/tokenmgr"

func newTracer(tp trace.TracerProvider) trace.Tracer {
	if tp == nil {
		tp = otel.GetTracerProvider()
	}
	return tp.Tracer(tracerName)
}

// startSpan starts one of the Manager's spans (names in docs/design.md):
// its attributes are grant names, versions and outcomes, never a token.
func (m *Manager) startSpan(ctx context.Context, name string, g *grantState, attrs ...attribute.KeyValue) (context.Context, trace.Span) {
	attrs = append(attrs, attribute.String("tokenmgr.grant", g.name))
	return m.tracer.Start(ctx, name, trace.WithAttributes(attrs...))
}

// endSpan ends span, marking it failed when err is set.
func endSpan(span trace.Span, err error) {
	if err != nil {
		span.SetStatus(codes.Error, describe(err))
	}
	span.End()
}

// outcomeOf names a provider call's result for the Observer and spans.
func outcomeOf(err error) string {
	if err == nil {
		return "ok"
	}
	switch class, _ := classify(err, time.Now()); class {
	case failDead:
		return "refused"
	case failConfig:
		return "config"
	}
	return "transient"
}
