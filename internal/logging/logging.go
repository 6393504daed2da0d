// Package logging builds the services' slog loggers: --log-level and
// --log-format (json or text) on every binary, durations as Go duration
// strings ("1.5s", not 1500000000 nanoseconds), and the trace and span ids
// of the active OpenTelemetry span on every record logged with a context
// that carries one (the *Context calls: InfoContext, WarnContext...).
package logging

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"

	"go.opentelemetry.io/otel/trace"
)

// Formats are the values of --log-format.
const (
	FormatJSON = "json"
	FormatText = "text"
)

// Config is --log-level and --log-format. Register it on a FlagSet, parse,
// then Validate and New.
type Config struct {
	Level  string
	Format string
}

// Register adds --log-level and --log-format to fs with these defaults.
func (c *Config) Register(fs *flag.FlagSet, level, format string) {
	fs.StringVar(&c.Level, "log-level", level, "log level: debug, info, warn, error")
	fs.StringVar(&c.Format, "log-format", format, "log format: json (one object a line) or text (key=value)")
}

// Validate checks both flags; its errors name the flag.
func (c *Config) Validate() error {
	if _, err := ParseLevel(c.Level); err != nil {
		return err
	}
	if c.Format != FormatJSON && c.Format != FormatText {
		return fmt.Errorf("--log-format %q: want json or text", c.Format)
	}
	return nil
}

// ParseLevel reads a --log-level value.
func ParseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return l, fmt.Errorf("--log-level %q: want debug, info, warn or error", s)
	}
	return l, nil
}

// New is the logger c describes, writing to w. Call Validate first: an
// invalid level or format falls back to info and json.
func (c *Config) New(w io.Writer) *slog.Logger {
	level, _ := ParseLevel(c.Level)
	return slog.New(NewHandler(w, c.Format, level))
}

// NewHandler is a JSON or text handler (text for FormatText, JSON for
// anything else) with durations as strings, wrapped in WithTrace.
func NewHandler(w io.Writer, format string, level slog.Leveler) slog.Handler {
	opts := &slog.HandlerOptions{Level: level, ReplaceAttr: ReplaceDuration}
	if format == FormatText {
		return WithTrace(slog.NewTextHandler(w, opts))
	}
	return WithTrace(slog.NewJSONHandler(w, opts))
}

// ReplaceDuration is a slog.HandlerOptions.ReplaceAttr that writes
// time.Duration values as Go duration strings (d.String(): "1m30s"),
// which the JSON handler would write as integer nanoseconds.
func ReplaceDuration(_ []string, a slog.Attr) slog.Attr {
	if a.Value.Kind() == slog.KindDuration {
		a.Value = slog.StringValue(a.Value.Duration().String())
	}
	return a
}

// Keys of the attributes WithTrace adds, as OpenTelemetry's log data model
// and most log pipelines name them.
const (
	TraceIDKey = "trace_id"
	SpanIDKey  = "span_id"
)

// WithTrace wraps h so that a record logged with a context holding a valid
// span context gets trace_id and span_id (hex) at the top level of the
// record, outside any group opened with WithGroup, so a log pipeline finds
// them in the same place on every line.
func WithTrace(h slog.Handler) slog.Handler { return &traceHandler{top: h, inner: h} }

type traceHandler struct {
	// top is the handler before the first WithGroup: where the ids go.
	top slog.Handler
	// inner is the whole handler; ops replay, on top, the WithGroup and
	// WithAttrs calls made since the first group.
	inner slog.Handler
	ops   []func(slog.Handler) slog.Handler
}

func (h *traceHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return h.inner.Enabled(ctx, l)
}

func (h *traceHandler) Handle(ctx context.Context, r slog.Record) error {
	sc := trace.SpanContextFromContext(ctx)
	if !sc.IsValid() {
		return h.inner.Handle(ctx, r)
	}
	ids := []slog.Attr{slog.String(TraceIDKey, sc.TraceID().String()), slog.String(SpanIDKey, sc.SpanID().String())}
	if len(h.ops) == 0 {
		r = r.Clone()
		r.AddAttrs(ids...)
		return h.inner.Handle(ctx, r)
	}
	// Inside a group: put the ids before it. Rare (the services open no
	// groups), so rebuilding the chain per record is fine.
	withIDs := h.top.WithAttrs(ids)
	for _, op := range h.ops {
		withIDs = op(withIDs)
	}
	return withIDs.Handle(ctx, r)
}

func (h *traceHandler) WithAttrs(as []slog.Attr) slog.Handler {
	if len(as) == 0 {
		return h
	}
	if len(h.ops) == 0 {
		n := h.inner.WithAttrs(as)
		return &traceHandler{top: n, inner: n}
	}
	return h.with(func(x slog.Handler) slog.Handler { return x.WithAttrs(as) })
}

func (h *traceHandler) WithGroup(name string) slog.Handler {
	if name == "" {
		return h
	}
	return h.with(func(x slog.Handler) slog.Handler { return x.WithGroup(name) })
}

func (h *traceHandler) with(op func(slog.Handler) slog.Handler) slog.Handler {
	return &traceHandler{top: h.top, inner: op(h.inner), ops: append(h.ops[:len(h.ops):len(h.ops)], op)}
}
