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
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/oauth2"
	"golang.org/x/time/rate"

	"github.com/tokenmgr/tokenmgr/internal/telemetry"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrprom"
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
// builds the handlers. When ctx ends (SIGTERM), /readyz reports draining.
func newServer(ctx context.Context, c *runConfig, opts []tokenmgr.Options) (*server, error) {
	reg := telemetry.NewRegistry()
	mt := newMetrics(reg)
	srv := &server{}
	wall := c.wallClock()
	for i, r := range c.regs {
		obs := tokenmgrprom.NewObserver(registrationLabel(r.name))
		o := opts[i]
		o.Observer = obs
		rn, err := newRunner(ctx, c, r, o, mt)
		if err != nil {
			closeRunners(ctx, srv.runners)
			return nil, fmt.Errorf("registration %s: %w", r.name, err)
		}
		rn.sched.wall = wall
		rn.sched.lastTick.Store(wall().UnixNano()) // the start counts as a tick: the first one has its bound to finish
		mt.addManager(reg, r.name, rn.m, obs)
		srv.runners = append(srv.runners, rn)
	}
	reg.MustRegister(newReauthCollector(srv.runners[0].m))
	h := &health{runners: srv.runners, now: wall, bound: livenessBound(c.tick), draining: ctx.Done(),
		ping: func(ctx context.Context) error { return opts[0].Redis.Ping(ctx).Err() }}
	mux := healthMux(h, reg)
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

// tracerProvider is o's, as the Manager uses it.
func tracerProvider(o tokenmgr.Options) trace.TracerProvider {
	if o.TracerProvider == nil {
		return otel.GetTracerProvider()
	}
	return o.TracerProvider
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
		log: m.Logger(), metrics: mt, tracer: tracerProvider(o).Tracer("github.com/tokenmgr/tokenmgr/cmd/refresher"), warnAbsolute: c.warnAbsolute, period: c.tick, holder: m.Holder(),
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

// livenessBound is how long a scheduler loop may go without completing a
// tick before /healthz fails: a few ticks, and at least 30 s, longer than a
// tick takes while Redis is down (each of its two commands then waits out
// a dial or read timeout), so that liveness never restarts a refresher for
// what a restart cannot fix.
func livenessBound(tick time.Duration) time.Duration { return max(3*tick, 30*time.Second) }

// health is what /healthz and /readyz look at.
type health struct {
	runners  []*runner
	now      func() time.Time // the clock the schedulers record their ticks by
	bound    time.Duration
	draining <-chan struct{} // closed on SIGTERM
	ping     func(context.Context) error
}

// stuck lists the registrations whose scheduler loop has not completed a
// tick within the bound.
func (h *health) stuck() []string {
	var out []string
	now := h.now()
	for _, rn := range h.runners {
		if age := now.Sub(time.Unix(0, rn.sched.lastTick.Load())); age > h.bound {
			out = append(out, fmt.Sprintf("registration %s: the scheduler has not completed a tick for %s (bound %s)", rn.reg.name, age.Round(time.Second), h.bound))
		}
	}
	return out
}

func (h *health) isDraining() bool {
	select {
	case <-h.draining:
		return true
	default:
		return false
	}
}

// healthMux serves /healthz (every scheduler loop ticks), /readyz (not
// draining, and Redis answers) and /metrics. Failures answer 503 with the
// reason on one line.
func healthMux(h *health, reg *prometheus.Registry) *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		if stuck := h.stuck(); len(stuck) > 0 {
			http.Error(w, strings.Join(stuck, "; "), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if h.isDraining() {
			http.Error(w, "draining: shutting down after SIGTERM", http.StatusServiceUnavailable)
			return
		}
		pctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		if err := h.ping(pctx); err != nil {
			http.Error(w, "not ready: "+redisTrouble(err), http.StatusServiceUnavailable)
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
	conn := &connector{stateTTL: c.stateTTL, routes: map[string]*route{}, secure: secureURL(c.redirectURL),
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
	rt := &route{cfg: &cfg, store: rn.m, httpClient: &http.Client{Timeout: o.Provider.HTTPTimeout}, pkce: rn.reg.usePKCE(c.pkce)}
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
