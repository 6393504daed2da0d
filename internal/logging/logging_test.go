package logging

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
)

func decode(t *testing.T, line []byte) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(line, &m); err != nil {
		t.Fatalf("not one JSON object: %q: %v", line, err)
	}
	return m
}

// Durations are Go duration strings in both formats, at the top level and
// inside groups; JSON would write nanoseconds.
func TestDurationsAsStrings(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(NewHandler(&buf, FormatJSON, slog.LevelInfo))
	log.Info("m", "took", 1500*time.Millisecond, slog.Group("g", "retry_in", 90*time.Second), "n", 3)
	m := decode(t, buf.Bytes())
	if m["took"] != "1.5s" || m["g"].(map[string]any)["retry_in"] != "1m30s" || m["n"] != 3.0 {
		t.Errorf("got %v, want took 1.5s, g.retry_in 1m30s, n 3", m)
	}
	buf.Reset()
	slog.New(NewHandler(&buf, FormatText, slog.LevelInfo)).Info("m", "took", 1500*time.Millisecond)
	if !strings.Contains(buf.String(), "took=1.5s") {
		t.Errorf("text: %q", buf.String())
	}
}

// spanCtx is a context with an active (recording) span of a real SDK
// tracer provider, and that span's ids.
func spanCtx(t *testing.T) (context.Context, trace.SpanContext) {
	tp := sdktrace.NewTracerProvider()
	t.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
	ctx, span := tp.Tracer("test").Start(t.Context(), "op")
	t.Cleanup(func() { span.End() })
	return ctx, span.SpanContext()
}

func TestTraceIDs(t *testing.T) {
	ctx, sc := spanCtx(t)
	var buf bytes.Buffer
	log := slog.New(NewHandler(&buf, FormatJSON, slog.LevelInfo)).With("registration", "jira")

	log.InfoContext(ctx, "in a span")
	m := decode(t, buf.Bytes())
	if m[TraceIDKey] != sc.TraceID().String() || m[SpanIDKey] != sc.SpanID().String() || m["registration"] != "jira" {
		t.Errorf("in a span: %v, want trace_id %s span_id %s", m, sc.TraceID(), sc.SpanID())
	}

	buf.Reset()
	log.InfoContext(t.Context(), "no span")
	log.Info("no context")
	for _, line := range bytes.Split(bytes.TrimSpace(buf.Bytes()), []byte("\n")) {
		if m := decode(t, line); m[TraceIDKey] != nil || m[SpanIDKey] != nil {
			t.Errorf("ids without a span: %v", m)
		}
	}

	// Inside groups the ids stay at the top level; the group keeps its
	// attributes, the top level its own.
	buf.Reset()
	log.WithGroup("req").With("path", "/x").WithGroup("inner").InfoContext(ctx, "grouped", "k", "v")
	m = decode(t, buf.Bytes())
	req, _ := m["req"].(map[string]any)
	inner, _ := req["inner"].(map[string]any)
	if m[TraceIDKey] != sc.TraceID().String() || m[SpanIDKey] != sc.SpanID().String() || m["registration"] != "jira" ||
		req["path"] != "/x" || inner["k"] != "v" || req[TraceIDKey] != nil || inner[TraceIDKey] != nil {
		t.Errorf("grouped: %v", m)
	}

	// Text too.
	buf.Reset()
	slog.New(NewHandler(&buf, FormatText, slog.LevelInfo)).InfoContext(ctx, "m")
	if !strings.Contains(buf.String(), "trace_id="+sc.TraceID().String()) || !strings.Contains(buf.String(), "span_id="+sc.SpanID().String()) {
		t.Errorf("text: %q", buf.String())
	}
}

// A span context that is not valid (the no-op tracer's) adds nothing.
func TestTraceIDsNoopSpan(t *testing.T) {
	var buf bytes.Buffer
	ctx, span := noop.NewTracerProvider().Tracer("x").Start(t.Context(), "op")
	defer span.End()
	slog.New(NewHandler(&buf, FormatJSON, slog.LevelInfo)).InfoContext(ctx, "m")
	if m := decode(t, buf.Bytes()); m[TraceIDKey] != nil {
		t.Errorf("ids from a no-op span: %v", m)
	}
}

func TestLevelFiltersBeforeTrace(t *testing.T) {
	ctx, _ := spanCtx(t)
	var buf bytes.Buffer
	log := slog.New(NewHandler(&buf, FormatJSON, slog.LevelWarn))
	log.InfoContext(ctx, "dropped")
	if buf.Len() != 0 {
		t.Errorf("info logged at warn: %q", buf.String())
	}
}

func TestConfig(t *testing.T) {
	for _, tc := range []struct {
		args    []string
		wantErr string
		json    bool
	}{
		{nil, "", true},
		{[]string{"--log-format", "text"}, "", false},
		{[]string{"--log-format", "logfmt"}, `--log-format "logfmt": want json or text`, false},
		{[]string{"--log-level", "loud"}, `--log-level "loud"`, false},
	} {
		var c Config
		fs := flag.NewFlagSet("x", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		c.Register(fs, "info", FormatJSON)
		if err := fs.Parse(tc.args); err != nil {
			t.Fatal(err)
		}
		err := c.Validate()
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%v: got %v, want %q", tc.args, err, tc.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("%v: %v", tc.args, err)
			continue
		}
		var buf bytes.Buffer
		c.New(&buf).Info("m")
		if got := strings.HasPrefix(buf.String(), "{"); got != tc.json {
			t.Errorf("%v: wrote %q, want JSON %v", tc.args, buf.String(), tc.json)
		}
	}
}
