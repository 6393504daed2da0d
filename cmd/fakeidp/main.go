// Command fakeidp serves the fake rotating identity provider of package
// tokenmgrtest on an address, for demos, docker-compose and integration
// tests. Never point real clients at it: it consents to everything.
//
// Endpoints: POST /oauth/token, GET /authorize (redirects with a code at
// once, or with --consent-page shows an Allow/Deny page that POSTs to
// /authorize, for browser tests), GET /rest/api/3/myself,
// GET /stats (counters as JSON), and for test harnesses POST /admin/grant
// (a new grant's token pair as JSON), POST /admin/faults (latency,
// answer_delay, fail_5xx, fail_429, retry_after, drop) and GET
// /admin/issued (every token issued so far, so a test can prove none of
// them leaked into a page or a log).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/oauth2"

	"github.com/tokenmgr/tokenmgr/internal/buildinfo"
	"github.com/tokenmgr/tokenmgr/internal/cli"
	"github.com/tokenmgr/tokenmgr/internal/logging"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
	stop()
	os.Exit(cli.Exit("fakeidp", err, os.Stderr))
}

type config struct {
	addr, profile, clientID, clientSecret, authStyle string
	seedGrant, seedRedis                             string
	accessTTL, latency, retryAfter                   time.Duration
	fail5xx, fail429, drop                           int
	consentPage                                      bool
	log                                              logging.Config
	version                                          bool
}

func parseFlags(args []string, stderr io.Writer) (config, error) {
	var c config
	fs := flag.NewFlagSet("fakeidp", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.addr, "addr", "127.0.0.1:8080", "listen `address`")
	fs.StringVar(&c.profile, "profile", "atlassian", "provider profile: atlassian, strict, grace, grace-xero, non-rotating")
	fs.StringVar(&c.clientID, "client-id", "client-id", "the one client id accepted")
	fs.StringVar(&c.clientSecret, "client-secret", "client-secret", "the one client secret accepted (a test value)")
	fs.StringVar(&c.authStyle, "auth-style", "any", "client authentication accepted: header, params or any")
	fs.DurationVar(&c.accessTTL, "access-ttl", time.Hour, "access token lifetime")
	fs.DurationVar(&c.latency, "latency", 0, "added to every token-endpoint answer")
	fs.IntVar(&c.fail5xx, "fail-5xx", 0, "answer the next `N` refreshes with 503")
	fs.IntVar(&c.fail429, "fail-429", 0, "answer the next `N` refreshes with 429")
	fs.DurationVar(&c.retryAfter, "retry-after", 5*time.Second, "Retry-After sent with 429")
	fs.IntVar(&c.drop, "drop", 0, "perform the next `N` rotations but drop their responses")
	fs.BoolVar(&c.consentPage, "consent-page", false, "at /authorize, show an Allow/Deny page instead of consenting at once (for browser tests)")
	fs.StringVar(&c.seedGrant, "seed-grant", "", "at start, create a grant and seed it into --seed-redis under this `name` (for demos)")
	fs.StringVar(&c.seedRedis, "seed-redis", "", "Redis `URL` for --seed-grant")
	c.log.Register(fs, "info", logging.FormatText)
	fs.BoolVar(&c.version, "version", false, "print the version and exit")
	if err := cli.Parse(fs, args); err != nil {
		return c, err
	}
	if c.version {
		return c, nil
	}
	if err := c.log.Validate(); err != nil {
		return c, err
	}
	if _, err := tokenmgrtest.ProfileByName(c.profile); err != nil {
		return c, err
	}
	if _, err := authStyle(c.authStyle); err != nil {
		return c, err
	}
	if c.accessTTL < time.Second {
		return c, fmt.Errorf("--access-ttl %s: at least 1s (expires_in is in seconds)", c.accessTTL)
	}
	if (c.seedGrant == "") != (c.seedRedis == "") {
		return c, errors.New("--seed-grant and --seed-redis go together")
	}
	if c.seedGrant != "" {
		if err := tokenmgr.ValidateGrantName(c.seedGrant); err != nil {
			return c, err
		}
	}
	if c.latency < 0 || c.fail5xx < 0 || c.fail429 < 0 || c.drop < 0 || c.retryAfter < 0 {
		return c, errors.New("fault knobs must not be negative")
	}
	return c, nil
}

func authStyle(s string) (oauth2.AuthStyle, error) {
	switch s {
	case "any":
		return oauth2.AuthStyleAutoDetect, nil
	case "header":
		return oauth2.AuthStyleInHeader, nil
	case "params":
		return oauth2.AuthStyleInParams, nil
	}
	return 0, fmt.Errorf("--auth-style %q: want header, params or any", s)
}

// newIdP builds the IdP and the handler with the admin endpoints.
func newIdP(c config) (*tokenmgrtest.IdP, http.Handler) {
	profile, _ := tokenmgrtest.ProfileByName(c.profile)
	style, _ := authStyle(c.authStyle)
	idp := tokenmgrtest.New(tokenmgrtest.Config{
		Profile: profile, ClientID: c.clientID, ClientSecret: c.clientSecret,
		AuthStyle: style, AccessTTL: c.accessTTL, ConsentPage: c.consentPage,
	})
	idp.SetLatency(c.latency)
	idp.Fail5xx(c.fail5xx)
	idp.Fail429(c.fail429, c.retryAfter)
	idp.DropResponses(c.drop)
	mux := http.NewServeMux()
	mux.Handle("/", idp)
	mux.HandleFunc("POST /admin/grant", func(w http.ResponseWriter, r *http.Request) {
		tok := idp.NewGrant(r.URL.Query().Get("scope"))
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{
			"access_token": tok.AccessToken, "refresh_token": tok.RefreshToken,
			"token_type": tok.TokenType, "expires_in": tok.ExpiresIn,
		})
	})
	mux.HandleFunc("GET /admin/issued", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(idp.IssuedTokens())
	})
	mux.HandleFunc("POST /admin/faults", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		if err := applyFaults(idp, q.Get("latency"), q.Get("fail_5xx"), q.Get("fail_429"), q.Get("retry_after"), q.Get("drop")); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		if d := q.Get("answer_delay"); d != "" {
			dd, err := time.ParseDuration(d)
			if err != nil || dd < 0 {
				http.Error(w, "answer_delay: want a duration", http.StatusBadRequest)
				return
			}
			idp.SetAnswerDelay(dd)
		}
		w.WriteHeader(http.StatusNoContent)
	})
	return idp, mux
}

func applyFaults(idp *tokenmgrtest.IdP, latency, f5xx, f429, retryAfter, drop string) error {
	ra := 5 * time.Second
	if retryAfter != "" {
		d, err := time.ParseDuration(retryAfter)
		if err != nil || d < 0 {
			return fmt.Errorf("retry_after %q: want a duration", retryAfter)
		}
		ra = d
	}
	if latency != "" {
		d, err := time.ParseDuration(latency)
		if err != nil || d < 0 {
			return fmt.Errorf("latency %q: want a duration", latency)
		}
		idp.SetLatency(d)
	}
	for _, k := range []struct {
		name, v string
		set     func(int)
	}{
		{"fail_5xx", f5xx, idp.Fail5xx},
		{"fail_429", f429, func(n int) { idp.Fail429(n, ra) }},
		{"drop", drop, idp.DropResponses},
	} {
		if k.v == "" {
			continue
		}
		n, err := strconv.Atoi(k.v)
		if err != nil || n < 0 {
			return fmt.Errorf("%s %q: want a count", k.name, k.v)
		}
		k.set(n)
	}
	return nil
}

func run(ctx context.Context, args []string, env func(string) string, stdout, stderr io.Writer) error {
	c, err := parseFlags(args, stderr)
	if err != nil {
		return err
	}
	if c.version {
		fmt.Fprintln(stdout, buildinfo.String("fakeidp"))
		return nil
	}
	log := c.log.New(stderr)
	idp, handler := newIdP(c)
	if c.seedGrant != "" {
		if err := seedGrant(ctx, idp, c, env(cli.EnvEncryptionKey), log); err != nil {
			return err
		}
	}
	ln, err := net.Listen("tcp", c.addr)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: handler, ReadHeaderTimeout: 10 * time.Second}
	// The first line on stdout is the address, so harnesses can use port 0.
	fmt.Fprintf(stdout, "listening on http://%s\n", ln.Addr())
	log.Info("fake IdP serving", "addr", ln.Addr().String(), "profile", c.profile, "access_ttl", c.accessTTL)
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return srv.Shutdown(sctx)
}

// seedGrant creates a grant and seeds it into Redis, encrypted with the
// keys in TOKENMGR_ENCRYPTION_KEY when set, retrying while Redis starts
// (docker-compose starts services together).
func seedGrant(ctx context.Context, idp *tokenmgrtest.IdP, c config, keys string, log *slog.Logger) error {
	o := tokenmgr.Options{Logger: log, AllowPlaintext: keys == ""} // the fake IdP's own demo: in clear without a key
	if c.profile == "atlassian" {
		o.Provider = tokenmgr.Atlassian // the idle and absolute expiry countdowns
	}
	if keys != "" {
		kr, err := tokenmgr.ParseKeyring(keys)
		if err != nil {
			return fmt.Errorf("%s: %w", cli.EnvEncryptionKey, err)
		}
		o.Sealer = kr
	}
	rdb, err := cli.NewRedis(c.seedRedis)
	if err != nil {
		return fmt.Errorf("--seed-redis: %w", err)
	}
	defer rdb.Close()
	o.Redis = rdb
	admin, err := tokenmgr.NewAdmin(o)
	if err != nil {
		return err
	}
	tok := idp.NewGrant("read:jira-work offline_access")
	for attempt := 0; ; attempt++ {
		v, err := admin.Seed(ctx, c.seedGrant, tok, tokenmgr.SeedOptions{})
		if err == nil {
			log.Info("grant seeded", "grant", c.seedGrant, "version", v)
			return nil
		}
		if attempt >= 30 {
			return fmt.Errorf("seed %s: %w", c.seedGrant, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Second):
		}
	}
}
