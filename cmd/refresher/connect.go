package main

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"errors"
	"html/template"
	"log/slog"
	"net/http"
	"net/url"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"
	"golang.org/x/oauth2"
	"golang.org/x/time/rate"

	"github.com/tokenmgr/tokenmgr/internal/cli"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
)

// connector bootstraps grants with the authorization-code flow, on the
// operator surface (behind gate): GET /connect/{grant} shows what will
// happen; its form POSTs (with the CSRF token) to /connect/{grant}, which
// sends the browser to the provider with a single-use, expiring state bound
// to a cookie (and PKCE), kept in Redis signed with key; GET /callback
// checks all three, exchanges the code, seeds the grant and returns to the
// dashboard with a signed note.
type connector struct {
	routes   map[string]*route // grant -> its registration
	fallback *route            // for grants of a registration that serves every grant
	rdb      redis.UniversalClient
	prefix   string // Redis key prefix for pending states
	stateTTL time.Duration
	log      *slog.Logger
	secure   bool          // the callback is https: mark cookies Secure
	limiter  *rate.Limiter // logins started, so a flood cannot fill Redis
	now      func() time.Time
	// key signs pending logins and the note after one (see signed.go);
	// derived on first use, as a login is rare and the derivation slow.
	key func() []byte
}

// route is what /connect needs of one registration.
type route struct {
	cfg        *oauth2.Config // with RedirectURL and Scopes
	params     []oauth2.AuthCodeOption
	store      grantStore
	httpClient *http.Client // carries the code exchange (timeouts)
	pkce       bool         // send a PKCE (S256) challenge: registration.usePKCE
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

// status reads grant's status for /connect. A missing record counts only
// when Redis answers a PING: refused credentials are not a grant to
// connect.
func (c *connector) status(ctx context.Context, rt *route, grant string) (tokenmgr.GrantStatus, error) {
	st, err := rt.store.Status(ctx, grant)
	if errors.Is(err, tokenmgr.ErrGrantNotFound) {
		if perr := c.rdb.Ping(ctx).Err(); perr != nil {
			return st, perr
		}
	}
	return st, err
}

// unavailable answers 503 for a Redis call that failed, naming its class.
func (c *connector) unavailable(w http.ResponseWriter, what string, err error) {
	c.log.Warn("connect: "+what, logErr(err))
	http.Error(w, what+": "+redisTrouble(err), http.StatusServiceUnavailable)
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
	}{Grant: grant, Status: "not connected", Replace: r.URL.Query().Get("replace") == "1"}
	st, err := c.status(r.Context(), rt, grant)
	switch {
	case err == nil:
		data.Status, data.Reason, data.Healthy = cli.Shown(st.Status), cli.Shown(st.Reason), st.Status == tokenmgr.StatusOK
	case !errors.Is(err, tokenmgr.ErrGrantNotFound):
		c.unavailable(w, "cannot read grant "+grant, err)
		return
	}
	data.CSRF = csrfToken(w, r, c.secure)
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	if err := confirmPage.Execute(w, data); err != nil {
		c.log.Error("connect page", logErr(err))
	}
}

// checkGrant answers 400 or 404 for a grant /connect cannot serve. A name
// with control or format characters is refused too: the pages, the logs
// and the note after the login would each show it altered.
func (c *connector) checkGrant(w http.ResponseWriter, grant string) (*route, bool) {
	if err := tokenmgr.ValidateGrantName(grant); err != nil {
		http.Error(w, cli.Shown(err.Error()), http.StatusBadRequest)
		return nil, false
	}
	if cli.Shown(grant) != grant {
		http.Error(w, "grant names with control or format characters cannot be connected", http.StatusBadRequest)
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
	st, err := c.status(r.Context(), rt, grant)
	switch {
	case err == nil && st.Status == tokenmgr.StatusOK && !replace:
		http.Error(w, "grant "+grant+" is healthy; tick 'replace' (replace=1) to replace it with a new consent", http.StatusConflict)
		return
	case err != nil && !errors.Is(err, tokenmgr.ErrGrantNotFound):
		c.unavailable(w, "cannot read grant "+grant, err)
		return
	}
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	state := base64.RawURLEncoding.EncodeToString(b)
	p := pendingConnect{Grant: grant, Started: c.now(), Replace: replace}
	opts := append([]oauth2.AuthCodeOption{}, rt.params...)
	if rt.pkce {
		p.Verifier = oauth2.GenerateVerifier()
		opts = append(opts, oauth2.S256ChallengeOption(p.Verifier))
	}
	js, _ := json.Marshal(p)
	// Signed and bound to the state: a record someone else wrote to Redis,
	// or one moved to another state, does not complete.
	if err := c.rdb.Set(r.Context(), c.stateKey(state), sign(c.key(), domainState, state, string(js)), c.stateTTL).Err(); err != nil {
		c.unavailable(w, "cannot store the login state", err)
		return
	}
	// The state is also bound to this browser: a callback link lured into
	// another browser does not complete. Lax: it must come back on the
	// provider's redirect.
	http.SetCookie(w, &http.Cookie{Name: stateCookieName(state), Value: state, Path: "/", MaxAge: int(c.stateTTL.Seconds()),
		HttpOnly: true, Secure: c.secure, SameSite: http.SameSiteLaxMode})
	c.log.Info("connect started", "grant", cli.Shown(grant), "replace", replace)
	http.Redirect(w, r, rt.cfg.AuthCodeURL(state, opts...), http.StatusSeeOther)
}

// pending reads and deletes (GETDEL: a state works once, whatever happens
// next) the login of state, and checks its signature and age.
func (c *connector) pending(ctx context.Context, state string) (pendingConnect, int, string, error) {
	var p pendingConnect
	raw, err := c.rdb.GetDel(ctx, c.stateKey(state)).Result()
	switch {
	case err == redis.Nil:
		return p, http.StatusBadRequest, "unknown, expired or already used state: start again at /connect/{grant}", nil
	case err != nil:
		return p, http.StatusServiceUnavailable, "cannot read the login state: " + redisTrouble(err), err
	}
	js, err := verify(c.key(), domainState, state, raw)
	if err != nil {
		c.log.Warn("refused a login state this refresher did not sign: someone with write access to Redis may have forged it")
		return p, http.StatusBadRequest, "login state not signed by this refresher: start again at /connect/{grant}", nil
	}
	if json.Unmarshal([]byte(js), &p) != nil || tokenmgr.ValidateGrantName(p.Grant) != nil {
		return p, http.StatusBadRequest, "corrupt login state", nil
	}
	if !c.now().Before(p.Started.Add(c.stateTTL)) {
		return p, http.StatusBadRequest, "expired login state: start again at /connect/{grant}", nil
	}
	return p, 0, "", nil
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
	p, code, msg, err := c.pending(r.Context(), state)
	if code != 0 {
		if err != nil {
			c.log.Warn("connect: cannot read the login state", logErr(err))
		}
		http.Error(w, msg, code)
		return
	}
	rt := c.route(p.Grant)
	if rt == nil {
		http.Error(w, "grant "+p.Grant+" is no longer served by this refresher", http.StatusNotFound)
		return
	}
	if e := q.Get("error"); e != "" {
		c.log.Warn("provider refused consent", "grant", cli.Shown(p.Grant), "error", cli.Shown(e))
		http.Error(w, "the provider answered "+cli.Shown(e), http.StatusBadRequest)
		return
	}
	authCode := q.Get("code")
	if authCode == "" {
		http.Error(w, "missing code", http.StatusBadRequest)
		return
	}
	// The grant may have been seeded meanwhile: replace it only if asked.
	st, err := c.status(r.Context(), rt, p.Grant)
	switch {
	case err == nil && st.Status == tokenmgr.StatusOK && !p.Replace:
		http.Error(w, "grant "+p.Grant+" became healthy meanwhile; start again and tick replace to replace it", http.StatusConflict)
		return
	case err != nil && !errors.Is(err, tokenmgr.ErrGrantNotFound):
		c.unavailable(w, "cannot read grant "+p.Grant, err)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
	defer cancel()
	ctx = context.WithValue(ctx, oauth2.HTTPClient, rt.httpClient)
	var opts []oauth2.AuthCodeOption
	if p.Verifier != "" {
		opts = append(opts, oauth2.VerifierOption(p.Verifier))
	}
	tok, err := rt.cfg.Exchange(ctx, authCode, opts...)
	if err != nil {
		why := cli.Shown(tokenmgr.DescribeProviderError(err))
		c.log.Error("code exchange failed", "grant", cli.Shown(p.Grant), "err", why)
		http.Error(w, "code exchange failed: "+why, http.StatusBadGateway)
		return
	}
	v, err := rt.store.Seed(ctx, p.Grant, tok, tokenmgr.SeedOptions{ConsentedAt: c.now()})
	if err != nil {
		c.log.Error("seeding the connected grant failed", "grant", cli.Shown(p.Grant), logErr(err))
		http.Error(w, "could not store the grant", http.StatusInternalServerError)
		return
	}
	c.log.Info("grant connected", "grant", cli.Shown(p.Grant), "version", v)
	// Back to the dashboard, which shows the grant healthy and, from the
	// signed cookie only, the note that it was connected. Relative, so
	// that it works behind a proxy that serves the refresher under a path.
	http.SetCookie(w, &http.Cookie{Name: noteCookie, Value: sealNote(c.key(), connectedNote{Grant: p.Grant, Version: v, Until: c.now().Add(time.Minute)}),
		Path: "/", MaxAge: 60, HttpOnly: true, Secure: c.secure, SameSite: http.SameSiteLaxMode})
	w.Header().Set("Location", "./?"+url.Values{"connected": {p.Grant}, "version": {strconv.FormatInt(v, 10)}}.Encode())
	w.WriteHeader(http.StatusSeeOther)
}
