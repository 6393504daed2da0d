package main

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"html"
	"log/slog"
	"net/http"
	"time"

	"github.com/redis/go-redis/v9"
	"golang.org/x/oauth2"
	"golang.org/x/time/rate"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
)

// connector bootstraps grants with the authorization-code flow:
// GET /connect/{grant} (operator only: HTTP basic auth) sends the browser to
// the provider with a single-use, expiring state bound to a cookie (and
// PKCE); GET /callback checks both, exchanges the code and seeds the grant.
type connector struct {
	routes   map[string]*route // grant -> its registration
	fallback *route            // for grants of a registration that serves every grant
	pkce     bool
	rdb      redis.UniversalClient
	prefix   string // Redis key prefix for pending states
	stateTTL time.Duration
	log      *slog.Logger
	// adminPassword guards /connect: whoever opens it can replace a grant.
	adminPassword string
	secureCookie  bool          // the callback is https: mark the cookie Secure
	limiter       *rate.Limiter // /connect attempts, so a flood cannot fill Redis
}

// route is what /connect needs of one registration.
type route struct {
	cfg        *oauth2.Config // with RedirectURL and Scopes
	params     []oauth2.AuthCodeOption
	admin      *tokenmgr.Admin
	httpClient *http.Client // carries the code exchange (timeouts)
}

const stateCookie = "tokenmgr_connect"

type pendingConnect struct {
	Grant    string    `json:"grant"`
	Verifier string    `json:"verifier,omitempty"`
	Started  time.Time `json:"started"`
	Replace  bool      `json:"replace,omitempty"` // the operator asked to replace a healthy grant
}

func (c *connector) stateKey(state string) string { return c.prefix + ":connect:" + state }

func (c *connector) route(grant string) *route {
	if r := c.routes[grant]; r != nil {
		return r
	}
	return c.fallback
}

// authorized compares digests, so neither the time taken nor an early
// length mismatch tells anything about the password.
func (c *connector) authorized(r *http.Request) bool {
	user, pass, ok := r.BasicAuth()
	u, p := sha256.Sum256([]byte(user)), sha256.Sum256([]byte(pass))
	wu, wp := sha256.Sum256([]byte("admin")), sha256.Sum256([]byte(c.adminPassword))
	return ok && subtle.ConstantTimeCompare(u[:], wu[:])&subtle.ConstantTimeCompare(p[:], wp[:]) == 1
}

func (c *connector) handleConnect(w http.ResponseWriter, r *http.Request) {
	// Limit before checking credentials: password guessing is limited too.
	if !c.limiter.Allow() {
		http.Error(w, "too many connect attempts; try again shortly", http.StatusTooManyRequests)
		return
	}
	if !c.authorized(r) {
		w.Header().Set("WWW-Authenticate", `Basic realm="tokenmgr refresher", charset="UTF-8"`)
		http.Error(w, "operator credentials required", http.StatusUnauthorized)
		return
	}
	grant := r.PathValue("grant")
	if err := tokenmgr.ValidateGrantName(grant); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	rt := c.route(grant)
	if rt == nil {
		http.Error(w, "grant "+grant+" is not served by this refresher (see --grant / --config)", http.StatusNotFound)
		return
	}
	// Replacing a live grant is a deliberate act.
	replace := r.URL.Query().Get("replace") == "1"
	if st, err := rt.admin.Status(r.Context(), grant); err == nil && st.Status == tokenmgr.StatusOK && !replace {
		http.Error(w, "grant "+grant+" is healthy; add ?replace=1 to replace it with a new consent", http.StatusConflict)
		return
	}
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	state := base64.RawURLEncoding.EncodeToString(b)
	p := pendingConnect{Grant: grant, Started: time.Now(), Replace: replace}
	opts := append([]oauth2.AuthCodeOption{}, rt.params...)
	if c.pkce {
		p.Verifier = oauth2.GenerateVerifier()
		opts = append(opts, oauth2.S256ChallengeOption(p.Verifier))
	}
	js, _ := json.Marshal(p)
	if err := c.rdb.Set(r.Context(), c.stateKey(state), js, c.stateTTL).Err(); err != nil {
		http.Error(w, "cannot store the login state: Redis unavailable", http.StatusServiceUnavailable)
		return
	}
	// The state is also bound to this browser: a callback link lured into
	// another browser does not complete.
	http.SetCookie(w, &http.Cookie{Name: stateCookie, Value: state, Path: "/", MaxAge: int(c.stateTTL.Seconds()),
		HttpOnly: true, Secure: c.secureCookie, SameSite: http.SameSiteLaxMode})
	c.log.Info("connect started", "grant", grant)
	http.Redirect(w, r, rt.cfg.AuthCodeURL(state, opts...), http.StatusFound)
}

func (c *connector) handleCallback(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	state := q.Get("state")
	if state == "" {
		http.Error(w, "missing state", http.StatusBadRequest)
		return
	}
	cookie, err := r.Cookie(stateCookie)
	if err != nil || subtle.ConstantTimeCompare([]byte(cookie.Value), []byte(state)) != 1 {
		http.Error(w, "this login was not started in this browser: start again at /connect/{grant}", http.StatusBadRequest)
		return
	}
	http.SetCookie(w, &http.Cookie{Name: stateCookie, Value: "", Path: "/", MaxAge: -1, HttpOnly: true, Secure: c.secureCookie, SameSite: http.SameSiteLaxMode})
	// GETDEL: a state works once, whatever happens next.
	js, err := c.rdb.GetDel(r.Context(), c.stateKey(state)).Bytes()
	if err == redis.Nil {
		http.Error(w, "unknown, expired or already used state: start again at /connect/{grant}", http.StatusBadRequest)
		return
	}
	if err != nil {
		http.Error(w, "cannot read the login state: Redis unavailable", http.StatusServiceUnavailable)
		return
	}
	var p pendingConnect
	if err := json.Unmarshal(js, &p); err != nil || tokenmgr.ValidateGrantName(p.Grant) != nil {
		http.Error(w, "corrupt login state", http.StatusBadRequest)
		return
	}
	rt := c.route(p.Grant)
	if rt == nil {
		http.Error(w, "grant "+p.Grant+" is no longer served by this refresher", http.StatusNotFound)
		return
	}
	if e := q.Get("error"); e != "" {
		c.log.Warn("provider refused consent", "grant", p.Grant, "error", e)
		http.Error(w, "the provider answered "+e, http.StatusBadRequest)
		return
	}
	code := q.Get("code")
	if code == "" {
		http.Error(w, "missing code", http.StatusBadRequest)
		return
	}
	// The grant may have been seeded meanwhile: replace it only if asked.
	if st, err := rt.admin.Status(r.Context(), p.Grant); err == nil && st.Status == tokenmgr.StatusOK && !p.Replace {
		http.Error(w, "grant "+p.Grant+" became healthy meanwhile; start again with ?replace=1 to replace it", http.StatusConflict)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
	defer cancel()
	ctx = context.WithValue(ctx, oauth2.HTTPClient, rt.httpClient)
	var opts []oauth2.AuthCodeOption
	if p.Verifier != "" {
		opts = append(opts, oauth2.VerifierOption(p.Verifier))
	}
	tok, err := rt.cfg.Exchange(ctx, code, opts...)
	if err != nil {
		c.log.Error("code exchange failed", "grant", p.Grant, "err", tokenmgr.DescribeProviderError(err))
		http.Error(w, "code exchange failed: "+tokenmgr.DescribeProviderError(err), http.StatusBadGateway)
		return
	}
	v, err := rt.admin.Seed(ctx, p.Grant, tok, tokenmgr.SeedOptions{ConsentedAt: time.Now()})
	if err != nil {
		c.log.Error("seeding the connected grant failed", "grant", p.Grant, "err", err)
		http.Error(w, "could not store the grant", http.StatusInternalServerError)
		return
	}
	c.log.Info("grant connected", "grant", p.Grant, "version", v)
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	fmt.Fprintf(w, "<!doctype html><title>Connected</title><p>Grant <b>%s</b> connected (version %d). You can close this page.</p>\n", html.EscapeString(p.Grant), v)
}
