package main

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"html/template"
	"log/slog"
	"net/http"
	"net/url"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"
	"golang.org/x/oauth2"
	"golang.org/x/time/rate"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
)

// connector bootstraps grants with the authorization-code flow, on the
// operator surface (behind gate): GET /connect/{grant} shows what will
// happen; its form POSTs (with the CSRF token) to /connect/{grant}, which
// sends the browser to the provider with a single-use, expiring state bound
// to a cookie (and PKCE); GET /callback checks both, exchanges the code,
// seeds the grant and returns to the dashboard.
type connector struct {
	routes   map[string]*route // grant -> its registration
	fallback *route            // for grants of a registration that serves every grant
	pkce     bool
	rdb      redis.UniversalClient
	prefix   string // Redis key prefix for pending states
	stateTTL time.Duration
	log      *slog.Logger
	secure   bool          // the callback is https: mark cookies Secure
	limiter  *rate.Limiter // logins started, so a flood cannot fill Redis
	now      func() time.Time
}

// route is what /connect needs of one registration.
type route struct {
	cfg        *oauth2.Config // with RedirectURL and Scopes
	params     []oauth2.AuthCodeOption
	store      grantStore
	httpClient *http.Client // carries the code exchange (timeouts)
}

const stateCookie = "tokenmgr_connect"

// stateCookieName names the cookie of one login, so that two Re-connects
// in flight (two grants, two tabs) do not overwrite each other's.
func stateCookieName(state string) string {
	if len(state) < 8 {
		return stateCookie
	}
	return stateCookie + "_" + state[:8]
}

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

// confirmPage is GET /connect/{grant}: a form, so that a link or an image
// on another site cannot start a login (state changes are POSTs).
var confirmPage = template.Must(template.New("connect.html").Funcs(pageFuncs).ParseFS(webFS, "web/connect.html"))

func (c *connector) handleConfirm(w http.ResponseWriter, r *http.Request) {
	grant := r.PathValue("grant")
	rt, ok := c.checkGrant(w, grant)
	if !ok {
		return
	}
	data := struct {
		Grant, Status, Reason, CSRF string
		Healthy, Replace            bool
	}{Grant: grant, Status: "not connected", CSRF: csrfToken(w, r, c.secure), Replace: r.URL.Query().Get("replace") == "1"}
	if st, err := rt.store.Status(r.Context(), grant); err == nil {
		data.Status, data.Reason, data.Healthy = st.Status, st.Reason, st.Status == tokenmgr.StatusOK
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	if err := confirmPage.Execute(w, data); err != nil {
		c.log.Error("connect page", "err", err)
	}
}

// checkGrant answers 400 or 404 for a grant /connect cannot serve.
func (c *connector) checkGrant(w http.ResponseWriter, grant string) (*route, bool) {
	if err := tokenmgr.ValidateGrantName(grant); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return nil, false
	}
	rt := c.route(grant)
	if rt == nil {
		http.Error(w, "grant "+grant+" is not served by this refresher (see --grant / --config)", http.StatusNotFound)
		return nil, false
	}
	return rt, true
}

// handleConnect is POST /connect/{grant}: it starts the login.
func (c *connector) handleConnect(w http.ResponseWriter, r *http.Request) {
	if !c.limiter.Allow() {
		http.Error(w, "too many connect attempts; try again shortly", http.StatusTooManyRequests)
		return
	}
	if !csrfValid(r) {
		http.Error(w, "missing or wrong CSRF token: start again from the dashboard or GET /connect/{grant}", http.StatusForbidden)
		return
	}
	grant := r.PathValue("grant")
	rt, ok := c.checkGrant(w, grant)
	if !ok {
		return
	}
	// Replacing a live grant is a deliberate act.
	replace := r.PostFormValue("replace") == "1"
	if st, err := rt.store.Status(r.Context(), grant); err == nil && st.Status == tokenmgr.StatusOK && !replace {
		http.Error(w, "grant "+grant+" is healthy; tick 'replace' (replace=1) to replace it with a new consent", http.StatusConflict)
		return
	}
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	state := base64.RawURLEncoding.EncodeToString(b)
	p := pendingConnect{Grant: grant, Started: c.now(), Replace: replace}
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
	// another browser does not complete. Lax: it must come back on the
	// provider's redirect.
	http.SetCookie(w, &http.Cookie{Name: stateCookieName(state), Value: state, Path: "/", MaxAge: int(c.stateTTL.Seconds()),
		HttpOnly: true, Secure: c.secure, SameSite: http.SameSiteLaxMode})
	c.log.Info("connect started", "grant", grant, "replace", replace)
	http.Redirect(w, r, rt.cfg.AuthCodeURL(state, opts...), http.StatusSeeOther)
}

func (c *connector) handleCallback(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	state := q.Get("state")
	if state == "" {
		http.Error(w, "missing state", http.StatusBadRequest)
		return
	}
	cookie, err := r.Cookie(stateCookieName(state))
	if err != nil || subtle.ConstantTimeCompare([]byte(cookie.Value), []byte(state)) != 1 {
		http.Error(w, "this login was not started in this browser: start again from the dashboard or /connect/{grant}", http.StatusBadRequest)
		return
	}
	http.SetCookie(w, &http.Cookie{Name: stateCookieName(state), Value: "", Path: "/", MaxAge: -1, HttpOnly: true, Secure: c.secure, SameSite: http.SameSiteLaxMode})
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
	if st, err := rt.store.Status(r.Context(), p.Grant); err == nil && st.Status == tokenmgr.StatusOK && !p.Replace {
		http.Error(w, "grant "+p.Grant+" became healthy meanwhile; start again and tick replace to replace it", http.StatusConflict)
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
	v, err := rt.store.Seed(ctx, p.Grant, tok, tokenmgr.SeedOptions{ConsentedAt: c.now()})
	if err != nil {
		c.log.Error("seeding the connected grant failed", "grant", p.Grant, "err", err)
		http.Error(w, "could not store the grant", http.StatusInternalServerError)
		return
	}
	c.log.Info("grant connected", "grant", p.Grant, "version", v)
	// Back to the dashboard, which shows the grant healthy. Relative, so
	// that it works behind a proxy that serves the refresher under a path.
	w.Header().Set("Location", "./?"+url.Values{"connected": {p.Grant}, "version": {strconv.FormatInt(v, 10)}}.Encode())
	w.WriteHeader(http.StatusSeeOther)
}
