package main

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/redis/go-redis/v9"
	"golang.org/x/oauth2"
	"golang.org/x/time/rate"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
)

// runner is one client registration at work: its Manager and the
// scheduler that pre-rotates its grants.
type runner struct {
	reg   *registration
	m     *tokenmgr.Manager
	sched *scheduler
	// store reads the same records with the same key; its Check decrypts
	// them, which the Manager's Status does not.
	store *tokenmgr.Admin
}

// server is every runner and the HTTP handlers they share.
type server struct {
	runners  []*runner
	handler  http.Handler // --listen: health, readiness, metrics; the operator surface too without --admin-listen
	operator http.Handler // the operator surface (nil: off)
}

// grantStore is what the operator surface and the metrics need of the
// grant records. *tokenmgr.Admin and *tokenmgr.Manager both have it.
type grantStore interface {
	Status(ctx context.Context, grant string) (tokenmgr.GrantStatus, error)
	Seed(ctx context.Context, grant string, tok *oauth2.Token, so tokenmgr.SeedOptions) (int64, error)
	DeadGrants(ctx context.Context) (int64, error)
}

var (
	_ grantStore = (*tokenmgr.Admin)(nil)
	_ grantStore = (*tokenmgr.Manager)(nil)
)

// newServer starts a runner per registration (opts[i] for c.regs[i]) and
// builds the handlers.
func newServer(ctx context.Context, c *runConfig, opts []tokenmgr.Options) (*server, error) {
	reg := prometheus.NewRegistry()
	mt := newMetrics(reg)
	srv := &server{}
	for i, r := range c.regs {
		rn, err := newRunner(ctx, c, r, opts[i], mt)
		if err != nil {
			closeRunners(ctx, srv.runners)
			return nil, fmt.Errorf("registration %s: %w", r.name, err)
		}
		mt.addManager(reg, r.name, rn.m)
		srv.runners = append(srv.runners, rn)
	}
	mt.addReauthGauge(reg, srv.runners[0].m)
	mux := healthMux(opts[0].Redis, reg)
	if c.operatorOn() {
		srv.operator = newOperatorSurface(c, srv.runners, opts)
		if c.operatorListen == "" {
			mux.Handle("/", srv.operator)
		}
	}
	srv.handler = mux
	return srv, nil
}

func closeRunners(ctx context.Context, runners []*runner) {
	for _, rn := range runners {
		_ = rn.m.Close(ctx)
	}
}

// clock is o's clock, as the Manager uses it.
func clock(o tokenmgr.Options) func() time.Time {
	if o.Now == nil {
		return time.Now
	}
	return o.Now
}

// newRunner starts r's Manager, with the refresher's margin, and its
// scheduler.
func newRunner(ctx context.Context, c *runConfig, r *registration, o tokenmgr.Options, mt *metrics) (*runner, error) {
	o.RefreshBefore = c.refreshBefore
	o.MaxRefreshFraction = c.maxFraction
	store, err := tokenmgr.NewAdmin(o)
	if err != nil {
		return nil, err
	}
	m, err := tokenmgr.New(ctx, o)
	if err != nil {
		return nil, err
	}
	s := &scheduler{
		m: m, now: clock(o), margin: c.refreshBefore, jitter: c.jitter, batch: c.batch,
		sem: make(chan struct{}, c.concurrency), limiter: rate.NewLimiter(rate.Limit(c.rate), 1),
		log: m.Logger(), metrics: mt, warnAbsolute: c.warnAbsolute, period: c.tick, holder: m.Holder(),
		notBefore: map[string]time.Time{}, running: map[string]bool{}, wake: make(chan struct{}, 1),
	}
	if r.grants != nil {
		s.only = map[string]bool{}
		for _, g := range r.grants {
			s.only[g] = true
		}
	}
	return &runner{reg: r, m: m, sched: s, store: store}, nil
}

// healthMux serves /healthz, /readyz (Redis answers) and /metrics.
func healthMux(rdb redis.UniversalClient, reg *prometheus.Registry) *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		pctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		if err := rdb.Ping(pctx).Err(); err != nil {
			http.Error(w, "redis unreachable", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	return mux
}

// newConnector builds /connect: one route per registration (its client,
// the redirect URL and scopes). nil without --redirect-url.
func newConnector(c *runConfig, runners []*runner, opts []tokenmgr.Options) *connector {
	if c.redirectURL == "" {
		return nil
	}
	conn := &connector{pkce: c.pkce, stateTTL: c.stateTTL, routes: map[string]*route{}, secure: secureURL(c.redirectURL),
		limiter: rate.NewLimiter(1, 10), rdb: opts[0].Redis, log: runners[0].m.Logger(), prefix: opts[0].KeyPrefix, now: clock(opts[0]),
		key: sync.OnceValue(func() []byte { return loginKey(c.creds, c.redirectURL) })}
	if conn.prefix == "" {
		conn.prefix = "tm"
	}
	for i, rn := range runners {
		rt := newRoute(c, rn, opts[i])
		if rn.reg.grants == nil {
			conn.fallback = rt
		}
		for _, g := range rn.reg.grants {
			conn.routes[g] = rt
		}
	}
	return conn
}

// newRoute is what /connect needs of one registration.
func newRoute(c *runConfig, rn *runner, o tokenmgr.Options) *route {
	cfg := *o.OAuth2
	cfg.RedirectURL = c.redirectURL
	cfg.Scopes = strings.Fields(rn.reg.scopes)
	rt := &route{cfg: &cfg, store: rn.m, httpClient: &http.Client{Timeout: o.Provider.HTTPTimeout}}
	if rn.reg.common.Provider == "atlassian" {
		rt.params = append(rt.params, oauth2.SetAuthURLParam("audience", "api.atlassian.com"), oauth2.SetAuthURLParam("prompt", "consent"))
		if !slices.Contains(cfg.Scopes, "offline_access") {
			cfg.Scopes = append(cfg.Scopes, "offline_access")
		}
	}
	return rt
}

// secureURL reports whether the pages are reached over https: cookies are
// then marked Secure.
func secureURL(redirectURL string) bool { return strings.HasPrefix(redirectURL, "https://") }

// newOperatorSurface builds the dashboard and /connect behind the
// credentials.
func newOperatorSurface(c *runConfig, runners []*runner, opts []tokenmgr.Options) http.Handler {
	first := runners[0].m
	rdb := opts[0].Redis
	d := &dashboard{runners: runners, conn: newConnector(c, runners, opts), now: clock(opts[0]), secure: secureURL(c.redirectURL),
		log: first.Logger(), holder: first.Holder(), overdue: c.jitter + 2*c.tick + time.Minute, warnAbsolute: c.warnAbsolute,
		ping: func(ctx context.Context) error { return rdb.Ping(ctx).Err() }}
	return operatorSurface(newGate(c.creds, c.trustedProxies, d.now), d)
}

// operatorSurface is the operator's part of the refresher: the dashboard,
// its JSON and /connect behind the credentials, /callback behind the login
// state. Cross-origin state changes are refused before anything else.
func operatorSurface(g *gate, d *dashboard) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /{$}", g.wrap(http.HandlerFunc(d.handlePage)))
	mux.Handle("GET /api/grants", g.wrap(http.HandlerFunc(d.handleJSON)))
	mux.Handle("GET /assets/", g.wrap(assets()))
	if d.conn != nil {
		mux.Handle("GET /connect/{grant}", g.wrap(http.HandlerFunc(d.conn.handleConfirm)))
		mux.Handle("POST /connect/{grant}", g.wrap(http.HandlerFunc(d.conn.handleConnect)))
		// The provider's redirect: the single-use state and its cookie
		// prove the login was started here by an operator.
		mux.HandleFunc("GET /callback", d.conn.handleCallback)
	}
	return securityHeaders(g.checkHost(http.NewCrossOriginProtection().Handler(mux)))
}
