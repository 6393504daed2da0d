// Command demo-worker is a worker built on pkg/tokenmgr: it calls an API
// through the managed client with some concurrency and reports what it saw.
//
// Without --redis (and TOKENMGR_REDIS_URL) it runs the embedded demo
// instead: miniredis, a fake IdP with short-lived tokens, and a fleet of
// workers that each have their own Manager, as separate pods would;
// --compare naive runs the same fleet the textbook way beside it.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.opentelemetry.io/otel/trace"

	"github.com/tokenmgr/tokenmgr/internal/buildinfo"
	"github.com/tokenmgr/tokenmgr/internal/cli"
	"github.com/tokenmgr/tokenmgr/internal/logging"
	"github.com/tokenmgr/tokenmgr/internal/telemetry"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrprom"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
	stop()
	os.Exit(exitStatus(err, os.Stderr))
}

// exitStatus is cli.Exit's, except that failed requests exit 1 without a
// word: the report has said how many.
func exitStatus(err error, stderr io.Writer) int {
	if errors.Is(err, errFailures) {
		return 1
	}
	return cli.Exit("demo-worker", err, stderr)
}

// errFailures makes the exit status non-zero when a request failed; the
// report has already said how many.
var errFailures = errors.New("some requests failed")

type config struct {
	common      cli.Common
	apiURL      string
	concurrency int
	duration    time.Duration
	requests    int64
	report      string
	log         logging.Config
	// metricsListen serves /metrics (off when empty).
	metricsListen string
	version       bool

	// embedded demo only
	waitGrant time.Duration
	workers   int
	profile   string
	accessTTL time.Duration
	compare   string
	stagger   time.Duration
}

func parseFlags(args []string, env func(string) string, stderr io.Writer) (*config, error) {
	c := &config{}
	fs := flag.NewFlagSet("demo-worker", flag.ContinueOnError)
	fs.SetOutput(stderr)
	c.common.Register(fs, env)
	fs.StringVar(&c.apiURL, "api-url", "", "API `URL` to call with the grant's token, e.g. https://api.atlassian.com/ex/jira/CLOUD_ID/rest/api/3/myself")
	fs.IntVar(&c.concurrency, "concurrency", 4, "concurrent requests per worker")
	fs.DurationVar(&c.duration, "duration", 0, "how long to run (default 30s, or 12s for the embedded demo); 0 with --requests: until they are done")
	fs.Int64Var(&c.requests, "requests", 0, "stop after this many requests in all (0: no limit)")
	fs.StringVar(&c.report, "report", "text", "report format at exit: text or json")
	c.log.Register(fs, "warn", logging.FormatText)
	fs.StringVar(&c.metricsListen, "metrics-listen", "", "`address` to serve /metrics on (e.g. :9090): the library's counters and histograms (tokenmgrprom), build, Go and process metrics; off when empty")
	fs.BoolVar(&c.version, "version", false, "print the version and exit")
	fs.DurationVar(&c.waitGrant, "wait-for-grant", 0, "wait up to this long for the grant to be seeded before starting (e.g. in docker compose)")
	fs.IntVar(&c.workers, "workers", 4, "embedded demo: workers in the fleet, each with its own Manager")
	fs.StringVar(&c.profile, "profile", "atlassian", "embedded demo: fake IdP profile: atlassian, strict, grace, grace-xero, non-rotating")
	fs.DurationVar(&c.accessTTL, "access-ttl", 2*time.Second, "embedded demo: access token lifetime")
	fs.StringVar(&c.compare, "compare", "", "embedded demo: 'naive' also runs the fleet with a per-worker x/oauth2 token source")
	fs.DurationVar(&c.stagger, "stagger", 2*time.Second, "embedded demo: workers start this far apart, as pods rolling out or scaling up, each deployed with the grant as it was first issued")
	if err := cli.Parse(fs, args); err != nil {
		return nil, err
	}
	if c.version {
		return c, nil
	}
	var errs []error
	if c.concurrency < 1 {
		errs = append(errs, fmt.Errorf("--concurrency %d: at least 1", c.concurrency))
	}
	if c.duration < 0 || c.requests < 0 {
		errs = append(errs, errors.New("--duration and --requests must not be negative"))
	}
	if c.report != "text" && c.report != "json" {
		errs = append(errs, fmt.Errorf("--report %q: want text or json", c.report))
	}
	if err := c.log.Validate(); err != nil {
		errs = append(errs, err)
	}
	if c.embedded() {
		if c.metricsListen != "" {
			errs = append(errs, errors.New("--metrics-listen is for a worker (--redis, --grant, --api-url...), not the embedded demo"))
		}
		if c.workers < 1 || c.workers > 1000 {
			errs = append(errs, fmt.Errorf("--workers %d: 1 to 1000", c.workers))
		}
		if _, err := demoProvider(c.profile); err != nil {
			errs = append(errs, err)
		}
		if c.accessTTL < time.Second {
			errs = append(errs, fmt.Errorf("--access-ttl %s: at least 1s", c.accessTTL))
		}
		if c.compare != "" && c.compare != "naive" {
			errs = append(errs, fmt.Errorf("--compare %q: the only comparison is naive", c.compare))
		}
		if c.stagger < 0 {
			errs = append(errs, errors.New("--stagger must not be negative"))
		}
		if c.duration == 0 && c.requests == 0 {
			c.duration = 12 * time.Second
		}
		if c.requests > 0 && c.requests < int64(c.workers) {
			errs = append(errs, fmt.Errorf("--requests %d: at least one per worker (%d)", c.requests, c.workers))
		}
	} else {
		if err := c.common.Validate(); err != nil {
			errs = append(errs, err)
		}
		if c.apiURL == "" {
			errs = append(errs, errors.New("--api-url is required"))
		}
		if c.duration == 0 && c.requests == 0 {
			c.duration = 30 * time.Second
		}
	}
	return c, errors.Join(errs...)
}

// embedded reports whether neither Redis nor an IdP nor a grant was
// configured: run the demo. A half-configured worker is an error instead.
func (c *config) embedded() bool {
	return c.common.RedisURL == "" && c.apiURL == "" && c.common.TokenURL == "" && c.common.Grant == "" && c.common.ClientID == ""
}

func run(ctx context.Context, args []string, env func(string) string, stdout, stderr io.Writer) error {
	c, err := parseFlags(args, env, stderr)
	if err != nil {
		return err
	}
	if c.version {
		fmt.Fprintln(stdout, buildinfo.String("demo-worker"))
		return nil
	}
	log := c.log.New(stderr)
	if c.embedded() {
		return runEmbedded(ctx, c, log, stdout)
	}
	tracing, err := telemetry.SetupTracing(ctx, "demo-worker", env, log)
	if err != nil {
		return err
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		if err := tracing.Shutdown(sctx); err != nil {
			log.Warn("could not flush the last spans", "err", cli.Shown(err.Error()))
		}
	}()
	return runWorker(ctx, c, log, tracing.Provider, stdout, stderr)
}

// runWorker is the real worker: one Manager, the configured grant and API.
func runWorker(ctx context.Context, c *config, log *slog.Logger, tp trace.TracerProvider, stdout, stderr io.Writer) error {
	o, err := c.common.Options()
	if err != nil {
		return err
	}
	defer cli.CloseClients(o)
	o.Logger = log
	o.TracerProvider = tp // nil: the otel global
	obs := tokenmgrprom.NewObserver(tokenmgrprom.Opts{})
	o.Observer = obs
	if c.common.HasPreviousSecret() {
		log.Info("a previous client secret is configured: a refresh refused as invalid_client is tried once with it (tokenmgr_secret_fallbacks_total)")
	}
	m, err := tokenmgr.New(ctx, o)
	if err != nil {
		return err
	}
	if c.metricsListen != "" {
		reg := telemetry.NewRegistry()
		reg.MustRegister(obs, tokenmgrprom.NewCollector(m, tokenmgrprom.Opts{}))
		stop, err := serveMetrics(c.metricsListen, reg, stderr, log)
		if err != nil {
			_ = m.Close(ctx)
			return err
		}
		defer stop()
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		if err := m.Close(cctx); err != nil {
			log.Error("close", "err", err)
		}
	}()
	if c.waitGrant > 0 {
		if err := waitForGrant(ctx, m, c.common.Grant, c.waitGrant, log); err != nil {
			return err
		}
	}
	rep := runLoad(ctx, loadSpec{client: workerClient(m, c.common.Grant), url: c.apiURL, concurrency: c.concurrency, duration: c.duration, requests: c.requests, log: log})
	st := m.Stats()
	rep.UnauthorizedSeen, rep.UnauthorizedAfterRetry, rep.Refreshes = st.Unauthorized, st.UnauthorizedAfterRetry, st.Refreshes
	if err := rep.write(stdout, c.report); err != nil {
		return err
	}
	if rep.Failed > 0 {
		return errFailures
	}
	return nil
}

// waitForGrant waits until the grant exists, for fleets started together
// with whatever seeds it.
func waitForGrant(ctx context.Context, m *tokenmgr.Manager, grant string, d time.Duration, log *slog.Logger) error {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	for {
		_, err := m.Token(ctx, grant)
		if err == nil || !errors.Is(err, tokenmgr.ErrGrantNotFound) {
			return nil // ready, or an error the requests will report
		}
		log.Info("waiting for the grant to be seeded", "grant", grant)
		select {
		case <-ctx.Done():
			return fmt.Errorf("grant %s was not seeded within %s", grant, d)
		case <-time.After(time.Second):
		}
	}
}

// serveMetrics serves reg on addr's /metrics until stop, and says where on
// stderr (stdout is the report's), so that port 0 works.
func serveMetrics(addr string, reg *prometheus.Registry, stderr io.Writer, log *slog.Logger) (stop func(), err error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--metrics-listen: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics server", "err", err)
		}
	}()
	fmt.Fprintf(stderr, "demo-worker: metrics on http://%s/metrics\n", ln.Addr())
	return func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}, nil
}
