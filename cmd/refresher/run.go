package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/oauth2"
	"golang.org/x/time/rate"

	"github.com/tokenmgr/tokenmgr/internal/cli"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
)

type runConfig struct {
	common        cli.Common
	listen        string
	refreshBefore time.Duration
	maxFraction   float64
	jitter        time.Duration
	tick          time.Duration
	concurrency   int
	rate          float64
	batch         int64
	redirectURL   string
	scopes        string
	pkce          bool
	stateTTL      time.Duration
	warnAbsolute  time.Duration
	logLevel      string
}

func parseRunFlags(args []string, env func(string) string, stderr io.Writer) (*runConfig, error) {
	c := &runConfig{}
	fs := newFlagSet("run", stderr)
	c.common.Register(fs, env)
	fs.StringVar(&c.listen, "listen", "127.0.0.1:8080", "`address` for /healthz, /readyz, /metrics, /connect/{grant} and /callback")
	fs.DurationVar(&c.refreshBefore, "refresh-before", 10*time.Minute, "refresh this long before a token expires (capped at 20% of its lifetime); keep it above the workers' RefreshBefore (5m by default) so they never wait")
	fs.Float64Var(&c.maxFraction, "max-refresh-fraction", 0.4, "cap of --refresh-before as a fraction of a token's lifetime; above the workers' (0.2 by default), so short-lived tokens are refreshed by the refresher first")
	fs.DurationVar(&c.jitter, "jitter", time.Minute, "delay each grant's refresh by a stable random part of this, so grants with equal expiries spread out; keep it below --refresh-before minus the workers' margin")
	fs.DurationVar(&c.tick, "tick", time.Second, "how often the schedule is read")
	fs.IntVar(&c.concurrency, "concurrency", 4, "refreshes in flight at once")
	fs.Float64Var(&c.rate, "rate", 10, "provider calls per second at most (this replica)")
	fs.Int64Var(&c.batch, "batch", 1000, "grants read from the schedule per tick")
	fs.StringVar(&c.redirectURL, "redirect-url", "", "public `URL` of /callback, registered with the provider (enables /connect)")
	fs.StringVar(&c.scopes, "scopes", "", "space-separated scopes asked for by /connect (atlassian: offline_access is always added)")
	fs.BoolVar(&c.pkce, "pkce", true, "use PKCE (S256) in /connect")
	fs.DurationVar(&c.stateTTL, "state-ttl", 10*time.Minute, "how long a /connect login may take")
	fs.DurationVar(&c.warnAbsolute, "warn-absolute", 30*24*time.Hour, "warn when a grant's absolute expiry is closer than this")
	fs.StringVar(&c.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	if err := parseArgs(fs, args); err != nil {
		return nil, err
	}
	var errs []error
	// The refresher serves every grant in the schedule; --grant is optional.
	grant := c.common.Grant
	if grant == "" {
		c.common.Grant = "unused"
	}
	if err := c.common.Validate(); err != nil {
		errs = append(errs, err)
	}
	c.common.Grant = grant
	if c.refreshBefore <= 0 || c.tick <= 0 || c.stateTTL <= 0 || c.jitter < 0 || c.warnAbsolute < 0 {
		errs = append(errs, errors.New("--refresh-before, --tick and --state-ttl must be positive; --jitter and --warn-absolute not negative"))
	}
	if c.jitter >= c.refreshBefore {
		errs = append(errs, fmt.Errorf("--jitter %s must be below --refresh-before %s", c.jitter, c.refreshBefore))
	}
	if c.maxFraction <= 0 || c.maxFraction > 0.5 {
		errs = append(errs, fmt.Errorf("--max-refresh-fraction %v: want (0, 0.5]", c.maxFraction))
	}
	if c.concurrency < 1 || c.batch < 1 || c.rate <= 0 {
		errs = append(errs, errors.New("--concurrency, --batch and --rate must be positive"))
	}
	var l slog.Level
	if err := l.UnmarshalText([]byte(c.logLevel)); err != nil {
		errs = append(errs, fmt.Errorf("--log-level %q: want debug, info, warn or error", c.logLevel))
	}
	if c.redirectURL != "" && c.common.AuthURL == "" {
		errs = append(errs, errors.New("--redirect-url needs --auth-url (or --provider atlassian)"))
	}
	return c, errors.Join(errs...)
}

func cmdRun(ctx context.Context, args []string, env func(string) string, stdout, stderr io.Writer) error {
	c, err := parseRunFlags(args, env, stderr)
	if err != nil {
		return err
	}
	var level slog.Level
	_ = level.UnmarshalText([]byte(c.logLevel))
	log := slog.New(slog.NewJSONHandler(stderr, &slog.HandlerOptions{Level: level}))

	o, err := c.common.Options()
	if err != nil {
		return err
	}
	defer cli.CloseClients(o)
	o.Logger = log
	p, err := newPod(ctx, c, o)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", c.listen)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: p.handler, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("http server", "err", err)
		}
	}()
	fmt.Fprintf(stdout, "listening on http://%s\n", ln.Addr())
	log.Info("refresher running", "listen", ln.Addr().String(), "refresh_before", c.refreshBefore, "jitter", c.jitter, "provider", c.common.Provider)

	// SIGTERM ends ctx: no new work; refreshes in flight finish and are
	// written; then the lease is released and held pairs flushed by Close.
	p.sched.loop(ctx, c.tick)
	log.Info("shutting down: in-flight refreshes finished")
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	_ = srv.Shutdown(sctx)
	if err := p.m.Close(sctx); err != nil {
		return err
	}
	log.Info("stopped")
	return nil
}

// pod is a running refresher without its listener: the Manager, the
// scheduler and the HTTP handler.
type pod struct {
	m       *tokenmgr.Manager
	sched   *scheduler
	handler http.Handler
}

func newPod(ctx context.Context, c *runConfig, o tokenmgr.Options) (*pod, error) {
	o.RefreshBefore = c.refreshBefore
	o.MaxRefreshFraction = c.maxFraction
	m, err := tokenmgr.New(ctx, o)
	if err != nil {
		return nil, err
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	log := o.Logger
	mt := newMetrics(m, m.Admin)
	s := &scheduler{
		m: m, now: o.Now, margin: c.refreshBefore, jitter: c.jitter, batch: c.batch,
		sem: make(chan struct{}, c.concurrency), limiter: rate.NewLimiter(rate.Limit(c.rate), 1),
		log: log, metrics: mt, warnAbsolute: c.warnAbsolute,
		notBefore: map[string]time.Time{}, running: map[string]bool{},
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		pctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		if err := o.Redis.Ping(pctx).Err(); err != nil {
			http.Error(w, "redis unreachable", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(mt.reg, promhttp.HandlerOpts{}))
	if c.redirectURL != "" {
		cfg := *o.OAuth2
		cfg.RedirectURL = c.redirectURL
		cfg.Scopes = strings.Fields(c.scopes)
		var params []oauth2.AuthCodeOption
		if c.common.Provider == "atlassian" {
			params = append(params, oauth2.SetAuthURLParam("audience", "api.atlassian.com"), oauth2.SetAuthURLParam("prompt", "consent"))
			if !strings.Contains(" "+c.scopes+" ", " offline_access ") {
				cfg.Scopes = append(cfg.Scopes, "offline_access")
			}
		}
		prefix := o.KeyPrefix
		if prefix == "" {
			prefix = "tm"
		}
		conn := &connector{cfg: &cfg, params: params, pkce: c.pkce, rdb: o.Redis, prefix: prefix, admin: m.Admin,
			stateTTL: c.stateTTL, log: log, httpClient: &http.Client{Timeout: o.Provider.HTTPTimeout}}
		mux.HandleFunc("GET /connect/{grant}", conn.handleConnect)
		mux.HandleFunc("GET /callback", conn.handleCallback)
	}
	return &pod{m: m, sched: s, handler: mux}, nil
}
