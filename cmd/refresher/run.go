package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/tokenmgr/tokenmgr/internal/buildinfo"
	"github.com/tokenmgr/tokenmgr/internal/cli"
	"github.com/tokenmgr/tokenmgr/internal/logging"
	"github.com/tokenmgr/tokenmgr/internal/telemetry"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
)

type runConfig struct {
	common        cli.Common
	config        string
	regs          []*registration
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
	pkce          *bool // --pkce; nil: on but for --provider atlassian
	stateTTL      time.Duration
	warnAbsolute  time.Duration
	log           logging.Config
	// operatorListen is --admin-listen: a separate listener for the
	// operator surface.
	operatorListen string
	passwordFile   string // --admin-password-file
	tokenFile      string // --admin-token-file
	creds          credentials
	trustedProxies []netip.Prefix // --admin-trusted-proxies

	// wall, when set, is the clock of the liveness check (tests); else
	// time.Now.
	wall func() time.Time
}

func (c *runConfig) wallClock() func() time.Time {
	if c.wall != nil {
		return c.wall
	}
	return time.Now
}

// optBool is a boolean flag that knows whether it was given: --pkce,
// whose default depends on the provider.
type optBool struct{ p **bool }

func (o optBool) String() string {
	if o.p == nil || *o.p == nil {
		return ""
	}
	return strconv.FormatBool(**o.p)
}

func (o optBool) Set(v string) error {
	b, err := strconv.ParseBool(v)
	if err != nil {
		return errors.New("want true or false")
	}
	*o.p = &b
	return nil
}

func (o optBool) IsBoolFlag() bool { return true }

// registration is one client registration and the grants it refreshes.
type registration struct {
	name   string
	common cli.Common
	scopes string
	pkce   *bool    // the registration's "pkce" in --config; nil: --pkce, else the provider's default
	grants []string // nil: every grant in the schedule
}

// usePKCE is whether /connect sends a PKCE challenge for r: its own
// setting, else --pkce, else on for every provider but atlassian, whose
// 3LO documentation does not describe PKCE (a login must not depend on
// what the provider may ignore or one day refuse).
func (r *registration) usePKCE(flag *bool) bool {
	switch {
	case r.pkce != nil:
		return *r.pkce
	case flag != nil:
		return *flag
	}
	return r.common.Provider != "atlassian"
}

// configFile is --config: several client registrations, each with its
// grants. Redis, keys, timing and the listener stay flags.
type configFile struct {
	Registrations []struct {
		Name             string `json:"name"`
		Provider         string `json:"provider"`
		TokenURL         string `json:"token_url"`
		AuthURL          string `json:"auth_url"`
		ClientID         string `json:"client_id"`
		ClientSecretFile string `json:"client_secret_file"`
		ClientSecretEnv  string `json:"client_secret_env"`
		// The client secret before the current one, while it rotates.
		ClientSecretPreviousFile string   `json:"client_secret_previous_file"`
		ClientSecretPreviousEnv  string   `json:"client_secret_previous_env"`
		AuthStyle                string   `json:"auth_style"`
		HTTPTimeout              string   `json:"http_timeout"`
		Scopes                   string   `json:"scopes"`
		PKCE                     *bool    `json:"pkce"`
		Grants                   []string `json:"grants"`
	} `json:"registrations"`
}

// loadConfig reads --config into registrations that share c's Redis and
// key flags.
func (c *runConfig) loadConfig(env func(string) string) error {
	raw, err := os.ReadFile(c.config)
	if err != nil {
		return fmt.Errorf("--config: %w", err)
	}
	return c.parseConfig(raw, env)
}

// parseConfig reads a --config document. Errors name the registration and
// field, never a secret (secrets come from files or the environment).
func (c *runConfig) parseConfig(raw []byte, env func(string) string) error {
	var f configFile
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&f); err != nil {
		return fmt.Errorf("--config %s: %w", c.config, err)
	}
	if len(f.Registrations) == 0 {
		return fmt.Errorf("--config %s: no registrations", c.config)
	}
	var errs []error
	owner := map[string]string{}
	names := map[string]bool{}
	for i, r := range f.Registrations {
		name := r.Name
		if name == "" {
			name = fmt.Sprintf("#%d", i+1)
		}
		if names[name] {
			// Its metrics and logs would be those of the other.
			errs = append(errs, fmt.Errorf("registration %s: the name is taken by another registration", name))
		}
		names[name] = true
		cm := c.common // Redis, lock masters, keys
		cm.Provider, cm.TokenURL, cm.AuthURL, cm.ClientID, cm.AuthStyle = r.Provider, r.TokenURL, r.AuthURL, r.ClientID, r.AuthStyle
		cm.ClientSecretFile, cm.HTTPTimeout = r.ClientSecretFile, 0
		if cm.AuthStyle == "" {
			cm.AuthStyle = "params"
		}
		if r.ClientSecretFile == "" && r.ClientSecretEnv == "" {
			// Never fall back to TOKENMGR_CLIENT_SECRET: that may be another
			// registration's secret, and would be sent to this provider
			// (hence cli.NoSecretEnv below).
			errs = append(errs, fmt.Errorf("registration %s: set client_secret_file or client_secret_env", name))
		}
		if r.HTTPTimeout != "" {
			d, err := time.ParseDuration(r.HTTPTimeout)
			if err != nil {
				errs = append(errs, fmt.Errorf("registration %s: http_timeout %q: %w", name, r.HTTPTimeout, err))
			}
			cm.HTTPTimeout = d
		}
		cm.SecretEnv = r.ClientSecretEnv
		if cm.SecretEnv == "" {
			cm.SecretEnv = cli.NoSecretEnv
		}
		// Likewise the previous secret: only what the registration names.
		cm.PreviousSecretFile, cm.PreviousSecretEnv = r.ClientSecretPreviousFile, r.ClientSecretPreviousEnv
		if cm.PreviousSecretEnv == "" {
			cm.PreviousSecretEnv = cli.NoSecretEnv
		}
		cm.UseEnv(env)
		if len(r.Grants) == 0 {
			errs = append(errs, fmt.Errorf("registration %s: no grants", name))
			continue
		}
		for _, g := range r.Grants {
			if err := tokenmgr.ValidateGrantName(g); err != nil {
				errs = append(errs, fmt.Errorf("registration %s: grants: %w", name, err))
			}
			if o, dup := owner[g]; dup {
				errs = append(errs, fmt.Errorf("grant %s is in registrations %s and %s", g, o, name))
			}
			owner[g] = name
		}
		cm.Grant = "unused" // the grants are checked above, each
		if err := cm.Validate(); err != nil {
			errs = append(errs, fmt.Errorf("registration %s: %w", name, err))
		}
		cm.Grant = ""
		c.regs = append(c.regs, &registration{name: name, common: cm, scopes: r.Scopes, pkce: r.PKCE, grants: r.Grants})
	}
	return errors.Join(errs...)
}

func parseRunFlags(args []string, env func(string) string, stderr io.Writer) (*runConfig, error) {
	c := &runConfig{}
	fs := newFlagSet("run", stderr)
	c.common.Register(fs, env)
	fs.StringVar(&c.listen, "listen", "127.0.0.1:8080", "`address` for /healthz, /readyz and /metrics (and the operator surface when admin credentials are set and --admin-listen is not)")
	fs.StringVar(&c.operatorListen, "admin-listen", "", "`address` of a separate listener for the operator surface: the dashboard at /, /api/grants, /connect/{grant}, /callback. Without admin credentials it must be loopback (reach it with kubectl port-forward)")
	fs.DurationVar(&c.refreshBefore, "refresh-before", 10*time.Minute, "refresh this long before a token expires (capped at --max-refresh-fraction of its lifetime); keep it above the workers' RefreshBefore (5m by default) so they never wait")
	fs.Float64Var(&c.maxFraction, "max-refresh-fraction", 0.4, "cap of --refresh-before as a fraction of a token's lifetime; above the workers' (0.2 by default), so short-lived tokens are refreshed by the refresher first")
	fs.DurationVar(&c.jitter, "jitter", time.Minute, "delay each grant's refresh by a stable random part of this, so grants with equal expiries spread out; keep it below --refresh-before minus the workers' margin")
	fs.DurationVar(&c.tick, "tick", time.Second, "how often the schedule is read")
	fs.IntVar(&c.concurrency, "concurrency", 4, "refreshes in flight at once")
	fs.Float64Var(&c.rate, "rate", 10, "provider calls per second at most (this replica)")
	fs.Int64Var(&c.batch, "batch", 1000, "grants read from the schedule per tick")
	fs.StringVar(&c.redirectURL, "redirect-url", "", "public `URL` of /callback, registered with the provider (enables /connect)")
	fs.StringVar(&c.scopes, "scopes", "", "space-separated scopes asked for by /connect (atlassian: offline_access is always added)")
	fs.Var(optBool{&c.pkce}, "pkce", "use PKCE (S256) in /connect (default: true, but false for --provider atlassian, whose 3LO documentation does not describe it; a --config registration's \"pkce\" wins)")
	fs.DurationVar(&c.stateTTL, "state-ttl", 10*time.Minute, "how long a /connect login may take")
	fs.DurationVar(&c.warnAbsolute, "warn-absolute", 30*24*time.Hour, "warn when a grant's absolute expiry is closer than this")
	c.log.Register(fs, "info", logging.FormatJSON)
	fs.StringVar(&c.config, "config", "", "JSON `file` of client registrations, each with its grants (see README); without it, the flags describe one registration, serving --grant or, if unset, every grant in the schedule")
	fs.StringVar(&c.passwordFile, "admin-password-file", "", "`file` with the operator password (HTTP basic auth, user admin) for the dashboard and /connect (else env "+envPassword+"); setting it turns the operator surface on")
	fs.Func("admin-trusted-proxies", "comma-separated `CIDRs` of reverse proxies in front of the operator surface: their X-Forwarded-For names the client whose failed logins are throttled (else every client behind a proxy shares its budget)", func(v string) error {
		for _, f := range strings.Split(v, ",") {
			p, err := netip.ParsePrefix(strings.TrimSpace(f))
			if err != nil {
				return fmt.Errorf("want CIDRs such as 10.0.0.0/8: %w", err)
			}
			c.trustedProxies = append(c.trustedProxies, p.Masked())
		}
		return nil
	})
	fs.StringVar(&c.tokenFile, "admin-token-file", "", "`file` with an operator bearer token for the dashboard, /api/grants and /connect (else env "+envToken+"); browsers may send it as user admin's basic-auth password")
	if err := parseArgs(fs, args); err != nil {
		return nil, err
	}
	var errs []error
	if c.config != "" {
		if err := c.common.ValidateStore(false, true); err != nil {
			errs = append(errs, err)
		}
		if err := c.loadConfig(env); err != nil {
			errs = append(errs, err)
		}
	} else {
		// One registration: --grant, or every grant in the schedule.
		grant := c.common.Grant
		if grant == "" {
			c.common.Grant = "unused"
		}
		if err := c.common.Validate(); err != nil {
			errs = append(errs, err)
		}
		c.common.Grant = grant
		reg := &registration{name: "default", common: c.common, scopes: c.scopes}
		if grant != "" {
			reg.grants = []string{grant}
		}
		c.regs = []*registration{reg}
	}
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
	if err := c.log.Validate(); err != nil {
		errs = append(errs, err)
	}
	if c.redirectURL != "" {
		for _, r := range c.regs {
			if r.common.AuthURL == "" {
				errs = append(errs, fmt.Errorf("registration %s: --redirect-url needs --auth-url (or --provider atlassian)", r.name))
			}
		}
	}
	var err error
	if c.creds.password, err = readSecret(c.passwordFile, envPassword, env); err != nil {
		errs = append(errs, fmt.Errorf("--admin-password-file: %w", err))
	}
	if c.creds.token, err = readSecret(c.tokenFile, envToken, env); err != nil {
		errs = append(errs, fmt.Errorf("--admin-token-file: %w", err))
	}
	errs = append(errs, c.validateOperator()...)
	return c, errors.Join(errs...)
}

func cmdRun(ctx context.Context, args []string, env func(string) string, stdout, stderr io.Writer) error {
	c, err := parseRunFlags(args, env, stderr)
	if err != nil {
		return err
	}
	log := c.log.New(stderr)
	tracing, err := telemetry.SetupTracing(ctx, "refresher", env, log)
	if err != nil {
		return err
	}
	defer func() {
		// After the Managers closed: their last spans go too.
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		if err := tracing.Shutdown(sctx); err != nil {
			log.Warn("could not flush the last spans", "err", cli.Shown(err.Error()))
		}
	}()

	var opts []tokenmgr.Options
	defer func() {
		for _, o := range opts {
			cli.CloseClients(o)
		}
	}()
	for _, r := range c.regs {
		o, err := r.common.Options()
		if err != nil {
			return fmt.Errorf("registration %s: %w", r.name, err)
		}
		o.Logger = log.With("registration", r.name)
		o.TracerProvider = tracing.Provider // nil: the otel global, a no-op unless the program set one
		opts = append(opts, o)
		if r.common.HasPreviousSecret() {
			o.Logger.Info("a previous client secret is configured: a refresh refused as invalid_client is tried once with it (tokenmgr_secret_fallbacks_total)")
		}
	}
	srv, err := newServer(ctx, c, opts)
	if err != nil {
		return err
	}
	servers, err := listen(c, srv, stdout, log)
	if err != nil {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		closeRunners(cctx, srv.runners)
		return err
	}
	if c.common.InsecurePlain {
		log.Error("--insecure-plaintext: tokens are stored in Redis UNENCRYPTED; anyone who can read Redis can use the grants")
	}
	log.Info("refresher running", "version", buildinfo.Version, "listen", c.listen, "admin_listen", c.operatorListen, "dashboard", srv.operator != nil,
		"registrations", len(c.regs), "refresh_before", c.refreshBefore, "jitter", c.jitter, "tick", c.tick, "liveness_bound", livenessBound(c.tick),
		"tracing", tracing.Endpoint)

	// SIGTERM ends ctx: /readyz answers 503 (draining); no new work;
	// refreshes in flight finish and are written; then the lease is
	// released and held pairs flushed by Close.
	var wg sync.WaitGroup
	for _, rn := range srv.runners {
		wg.Go(func() { rn.sched.loop(ctx, c.tick) })
	}
	<-ctx.Done()
	log.Info("draining: /readyz answers 503; waiting for in-flight refreshes")
	wg.Wait()
	log.Info("shutting down: in-flight refreshes finished")
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	for _, hs := range servers {
		_ = hs.Shutdown(sctx)
	}
	var errs []error
	for _, rn := range srv.runners {
		errs = append(errs, rn.m.Close(sctx))
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	log.Info("stopped")
	return nil
}

// listen serves srv on --listen, and its operator surface on --admin-listen
// when set.
func listen(c *runConfig, srv *server, stdout io.Writer, log *slog.Logger) ([]*http.Server, error) {
	type endpoint struct {
		addr, what string
		h          http.Handler
		operator   bool // the separate operator listener
	}
	eps := []endpoint{{c.listen, "listening on", srv.handler, false}}
	if c.operatorListen != "" {
		eps = append(eps, endpoint{c.operatorListen, "operator dashboard on", srv.operator, true})
	} else if srv.operator != nil {
		eps[0].what = "listening (operator dashboard at /) on"
	}
	var servers []*http.Server
	for _, ep := range eps {
		ln, err := net.Listen("tcp", ep.addr)
		if err == nil && ep.operator && c.creds.none() {
			// The flag was checked, but a name such as localhost resolves
			// at listen time: check what was bound.
			if tcp, ok := ln.Addr().(*net.TCPAddr); !ok || !tcp.IP.IsLoopback() {
				ln.Close()
				err = fmt.Errorf("--admin-listen %s bound %s, not a loopback address; without admin credentials it must be", ep.addr, ln.Addr())
			}
		}
		if err != nil {
			for _, hs := range servers {
				_ = hs.Close()
			}
			return nil, err
		}
		hs := &http.Server{Handler: ep.h, ReadHeaderTimeout: 10 * time.Second}
		go func() {
			if err := hs.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("http server", "err", err)
			}
		}()
		fmt.Fprintf(stdout, "%s http://%s\n", ep.what, ln.Addr())
		servers = append(servers, hs)
	}
	return servers, nil
}
