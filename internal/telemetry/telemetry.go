// Package telemetry sets up what the services export besides logs: the
// Prometheus registry every binary's /metrics starts from (build
// information, Go runtime and process collectors), and OpenTelemetry
// tracing over OTLP when the standard environment variables ask for it.
package telemetry

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/tokenmgr/tokenmgr/internal/buildinfo"
)

// NewRegistry is a Prometheus registry with tokenmgr_build_info, the Go
// runtime collector (go_*) and the process collector (process_*): what
// every /metrics of the project serves besides its own metrics.
func NewRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		buildinfo.NewCollector(),
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	return reg
}

// The environment variables of the OpenTelemetry specification that
// Tracing reads itself. The exporter reads the others it knows
// (OTEL_EXPORTER_OTLP_HEADERS, _TIMEOUT, _COMPRESSION, _CERTIFICATE,
// _INSECURE...), the SDK OTEL_TRACES_SAMPLER and OTEL_BSP_*, and the
// resource OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, all from the
// process environment.
const (
	EnvEndpoint       = "OTEL_EXPORTER_OTLP_ENDPOINT"
	EnvTracesEndpoint = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
	EnvProtocol       = "OTEL_EXPORTER_OTLP_PROTOCOL"
	EnvTracesProtocol = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
	EnvTracesExporter = "OTEL_TRACES_EXPORTER"
	EnvSDKDisabled    = "OTEL_SDK_DISABLED"
	protocolGRPC      = "grpc"
	protocolHTTPProto = "http/protobuf"
	protocolHTTPJSON  = "http/json"
	defaultTracesPath = "/v1/traces"
	defaultProtocol   = protocolHTTPProto // the specification's default
)

// Tracing is the services' tracing: a TracerProvider for
// tokenmgr.Options.TracerProvider, also installed as the otel global, and
// Shutdown to flush it at exit.
type Tracing struct {
	// Provider is nil when tracing is off.
	Provider trace.TracerProvider
	// Endpoint and Protocol say where spans go ("" when off); Endpoint
	// has any password in the URL masked, for logs.
	Endpoint, Protocol string
	shutdown           func(context.Context) error
}

// Enabled reports whether spans are exported.
func (t *Tracing) Enabled() bool { return t.Provider != nil }

// Shutdown exports the spans still buffered and stops the exporter. Safe
// on a Tracing that is off.
func (t *Tracing) Shutdown(ctx context.Context) error {
	if t == nil || t.shutdown == nil {
		return nil
	}
	return t.shutdown(ctx)
}

// SetupTracing exports spans over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT or
// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set (env is os.Getenv outside
// tests): OTLP/HTTP with protobuf bodies, or gRPC when
// OTEL_EXPORTER_OTLP_PROTOCOL (or _TRACES_PROTOCOL) is grpc. The resource
// names the service (OTEL_SERVICE_NAME overrides it) and its version.
// Without an endpoint, or with OTEL_SDK_DISABLED=true or
// OTEL_TRACES_EXPORTER=none, nothing is set up and nothing is sent.
//
// Exporter errors (a collector that is down) go to log, never stop the
// service.
func SetupTracing(ctx context.Context, service string, env func(string) string, log *slog.Logger) (*Tracing, error) {
	if strings.EqualFold(strings.TrimSpace(env(EnvSDKDisabled)), "true") {
		return &Tracing{}, nil
	}
	switch e := strings.TrimSpace(env(EnvTracesExporter)); e {
	case "", "otlp":
	case "none":
		return &Tracing{}, nil
	default:
		return nil, fmt.Errorf("%s=%s: only otlp and none are supported", EnvTracesExporter, e)
	}
	endpoint, protocol, err := endpointFrom(env)
	if err != nil || endpoint == "" {
		return &Tracing{}, err
	}
	var exp sdktrace.SpanExporter
	switch protocol {
	case protocolGRPC:
		exp, err = otlptracegrpc.New(ctx, otlptracegrpc.WithEndpointURL(endpoint))
	default:
		exp, err = otlptracehttp.New(ctx, otlptracehttp.WithEndpointURL(endpoint))
	}
	if err != nil {
		return nil, fmt.Errorf("OTLP trace exporter for %s: %w", endpoint, err)
	}
	res, err := resource.New(ctx,
		resource.WithTelemetrySDK(),
		resource.WithHost(),
		resource.WithAttributes(semconv.ServiceName(service), semconv.ServiceVersion(buildinfo.Version)),
		resource.WithFromEnv(), // OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win
	)
	if err != nil {
		if res == nil {
			return nil, fmt.Errorf("OpenTelemetry resource: %w", err)
		}
		log.Warn("opentelemetry: part of the resource could not be detected", "err", err)
	}
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp), sdktrace.WithResource(res))
	otel.SetTracerProvider(tp)
	otel.SetTextMapPropagator(propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{}))
	otel.SetErrorHandler(otel.ErrorHandlerFunc(func(err error) {
		log.Warn("opentelemetry", "err", err) // e.g. a collector that is down: spans dropped
	}))
	shown := endpoint
	if u, err := url.Parse(endpoint); err == nil {
		shown = u.Redacted()
	}
	return &Tracing{Provider: tp, Endpoint: shown, Protocol: protocol, shutdown: tp.Shutdown}, nil
}

// endpointFrom is the traces endpoint URL and protocol the environment
// asks for; "" when none. OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is used as it
// is; OTEL_EXPORTER_OTLP_ENDPOINT is a base URL, to which OTLP/HTTP adds
// /v1/traces, as the specification says.
func endpointFrom(env func(string) string) (endpoint, protocol string, err error) {
	protocol = strings.TrimSpace(env(EnvTracesProtocol))
	if protocol == "" {
		protocol = strings.TrimSpace(env(EnvProtocol))
	}
	if protocol == "" {
		protocol = defaultProtocol
	}
	switch protocol {
	case protocolGRPC, protocolHTTPProto:
	case protocolHTTPJSON:
		return "", "", fmt.Errorf("%s=%s: the Go OTLP exporter sends http/protobuf or grpc", EnvProtocol, protocol)
	default:
		return "", "", fmt.Errorf("%s=%s: want http/protobuf or grpc", EnvProtocol, protocol)
	}
	name, raw := EnvTracesEndpoint, strings.TrimSpace(env(EnvTracesEndpoint))
	if raw == "" {
		name, raw = EnvEndpoint, strings.TrimSpace(env(EnvEndpoint))
		if raw == "" {
			return "", "", nil
		}
		if protocol == protocolHTTPProto {
			raw = strings.TrimSuffix(raw, "/") + defaultTracesPath
		}
	}
	// The exporters keep their default (localhost) for a URL they cannot
	// parse: refuse it here instead of sending spans somewhere else.
	u, perr := url.Parse(raw)
	if perr != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return "", "", errors.New(name + ": want an http:// or https:// URL with a host, e.g. http://otel-collector:4318")
	}
	return raw, protocol, nil
}
