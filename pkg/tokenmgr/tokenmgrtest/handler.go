package tokenmgrtest

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"html/template"
	"io"
	"maps"
	"mime"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"time"

	"golang.org/x/oauth2"
)

// Paths served by the IdP. The token and authorize paths match Atlassian's;
// the API path is Jira Cloud's "who am I" call.
const (
	tokenPath     = "/oauth/token"
	authorizePath = "/authorize"
	apiPath       = "/rest/api/3/myself"
	statsPath     = "/stats"
)

// codeTTL is the lifetime of an authorization code.
const codeTTL = time.Minute

// atlassianInvalidGrant is the description Atlassian sends with a dead
// refresh token; clients may match it, so it is reproduced byte for byte.
const atlassianInvalidGrant = "Unknown or invalid refresh token."

// Server is an IdP listening on a local httptest server.
type Server struct {
	*IdP
	// URL is the base URL, http://127.0.0.1:PORT, without a trailing slash.
	URL string
	srv *httptest.Server
}

// NewServer starts an IdP on a local address. Call Close when done.
func NewServer(cfg Config) *Server {
	p := New(cfg)
	srv := httptest.NewServer(p)
	return &Server{IdP: p, URL: srv.URL, srv: srv}
}

// Close shuts the server down and blocks until all requests have finished.
func (s *Server) Close() { s.srv.Close() }

// TokenURL is the token endpoint.
func (s *Server) TokenURL() string { return s.URL + tokenPath }

// AuthURL is the authorization endpoint.
func (s *Server) AuthURL() string { return s.URL + authorizePath }

// APIURL is a protected API resource that accepts the IdP's access tokens.
func (s *Server) APIURL() string { return s.URL + apiPath }

// OAuthConfig returns a client configuration for this server using the given
// client-authentication style.
func (s *Server) OAuthConfig(auth oauth2.AuthStyle) *oauth2.Config {
	return &oauth2.Config{
		ClientID:     s.cfg.ClientID,
		ClientSecret: s.cfg.ClientSecret,
		Endpoint: oauth2.Endpoint{
			AuthURL:   s.AuthURL(),
			TokenURL:  s.TokenURL(),
			AuthStyle: auth,
		},
	}
}

// ServeHTTP implements http.Handler.
func (p *IdP) ServeHTTP(w http.ResponseWriter, r *http.Request) { p.mux.ServeHTTP(w, r) }

func (p *IdP) routes() *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+tokenPath, p.handleToken)
	mux.HandleFunc("GET "+authorizePath, p.handleAuthorize)
	if p.cfg.ConsentPage {
		mux.HandleFunc("POST "+authorizePath, p.handleConsent)
	}
	mux.HandleFunc("GET "+apiPath, p.handleAPI)
	mux.HandleFunc("GET "+statsPath, p.handleStats)
	return mux
}

// reply is a response computed under the mutex and written after it.
type reply struct {
	status int
	header map[string]string
	body   any
}

func oauthError(status int, code, desc string) reply {
	body := map[string]string{"error": code}
	if desc != "" {
		body["error_description"] = desc
	}
	return reply{status: status, body: body}
}

func writeJSON(w http.ResponseWriter, rep reply) {
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Cache-Control", "no-store")
	h.Set("Pragma", "no-cache")
	for k, v := range rep.header {
		h.Set(k, v)
	}
	w.WriteHeader(rep.status)
	_ = json.NewEncoder(w).Encode(rep.body)
}

func (p *IdP) handleToken(w http.ResponseWriter, r *http.Request) {
	// Read the body before sleeping: net/http notices a client hanging up
	// (and cancels r.Context()) only once the body has been consumed.
	params, err := tokenParams(w, r)

	p.mu.Lock()
	latency := p.latency
	p.mu.Unlock()
	if latency > 0 {
		t := time.NewTimer(latency)
		select {
		case <-t.C:
		case <-r.Context().Done():
			t.Stop()
			return // the client is gone: change nothing
		}
	}

	if err != nil {
		writeJSON(w, oauthError(http.StatusBadRequest, "invalid_request", err.Error()))
		return
	}
	rep, drop := p.token(r, params)
	if drop {
		dropConnection(w)
		return
	}
	p.mu.Lock()
	after := p.answerDelay
	p.mu.Unlock()
	if after > 0 {
		// The rotation has happened; the answer is late. A client that
		// dies now has spent its refresh token without learning the new one.
		time.Sleep(after)
	}
	writeJSON(w, rep)
}

// token applies the token-endpoint rules under the mutex. drop reports that
// the response must not reach the client.
func (p *IdP) token(r *http.Request, params url.Values) (rep reply, drop bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	grant := params.Get("grant_type")
	isRefresh := grant == "refresh_token"
	if isRefresh {
		switch {
		case p.fail5xx > 0:
			p.fail5xx--
			p.stats.Injected5xx++
			return oauthError(http.StatusServiceUnavailable, "temporarily_unavailable", "injected fault"), false
		case p.failBusy > 0:
			p.failBusy--
			p.stats.InjectedBusy++
			return oauthError(http.StatusBadRequest, "invalid_request",
				"The request could not be completed because multiple concurrent requests using the same token were received. Please retry the request."), false
		case p.fail429 > 0:
			p.fail429--
			p.stats.Injected429++
			rep := oauthError(http.StatusTooManyRequests, "rate_limited", "injected fault")
			rep.header = map[string]string{"Retry-After": strconv.FormatInt(ceilSeconds(p.retryAfter), 10)}
			return rep, false
		case p.drop > 0:
			p.drop--
			p.stats.Dropped++
			drop = true
		}
	}

	if rep, ok := p.authenticateLocked(r, params); !ok {
		if isRefresh {
			p.stats.RefreshFailed++
		}
		return rep, drop
	}

	switch grant {
	case "":
		return oauthError(http.StatusBadRequest, "invalid_request", "missing grant_type"), drop
	case "refresh_token":
		return p.refreshGrantLocked(params.Get("refresh_token")), drop
	case "authorization_code":
		return p.codeGrantLocked(params), drop
	default:
		return oauthError(http.StatusBadRequest, "unsupported_grant_type", ""), drop
	}
}

// authenticateLocked checks the client credentials and their style.
func (p *IdP) authenticateLocked(r *http.Request, params url.Values) (reply, bool) {
	var id, secret string
	var style oauth2.AuthStyle
	if u, pw, ok := r.BasicAuth(); ok {
		// RFC 6749 2.3.1: credentials are form-encoded before Basic encoding.
		id, secret, style = unescape(u), unescape(pw), oauth2.AuthStyleInHeader
	} else if params.Has("client_id") {
		id, secret, style = params.Get("client_id"), params.Get("client_secret"), oauth2.AuthStyleInParams
	} else {
		return oauthError(http.StatusUnauthorized, "invalid_client", "no client authentication"), false
	}
	if p.cfg.AuthStyle != oauth2.AuthStyleAutoDetect && style != p.cfg.AuthStyle {
		return oauthError(http.StatusUnauthorized, "invalid_client", "unsupported client authentication style"), false
	}
	idOK := subtle.ConstantTimeCompare([]byte(id), []byte(p.cfg.ClientID)) == 1
	secretOK := subtle.ConstantTimeCompare([]byte(secret), []byte(p.cfg.ClientSecret)) == 1
	if !idOK || !secretOK {
		if p.isAtlassian() {
			return oauthError(http.StatusUnauthorized, "access_denied", "Unauthorized"), false
		}
		return oauthError(http.StatusUnauthorized, "invalid_client", "client authentication failed"), false
	}
	return reply{}, true
}

func (p *IdP) isAtlassian() bool { return p.cfg.Profile.Name == Atlassian.Name }

func (p *IdP) refreshGrantLocked(rt string) reply {
	if rt == "" {
		p.stats.RefreshFailed++
		return oauthError(http.StatusBadRequest, "invalid_request", "missing refresh_token")
	}
	out, fam, at, exp := p.refreshLocked(rt)
	switch out {
	case refreshReuse, refreshUnknown:
		desc := "refresh token reuse detected"
		if out == refreshUnknown {
			desc = "unknown or revoked refresh token"
		}
		if p.isAtlassian() {
			desc = atlassianInvalidGrant
		}
		return oauthError(p.cfg.Profile.InvalidGrantStatus, "invalid_grant", desc)
	}
	newRT := fam.current
	if out == refreshKept {
		newRT = "" // non-rotating providers omit refresh_token
	}
	return p.tokenReplyLocked(fam, at, exp, newRT)
}

func (p *IdP) tokenReplyLocked(fam *family, at string, exp time.Time, rt string) reply {
	body := map[string]any{
		"access_token": at,
		"token_type":   "Bearer",
		"expires_in":   ceilSeconds(exp.Sub(p.nowLocked())),
		"scope":        fam.scope,
	}
	if rt != "" {
		body["refresh_token"] = rt
	}
	return reply{status: http.StatusOK, body: body}
}

func (p *IdP) codeGrantLocked(params url.Values) reply {
	bad := func(desc string) reply { return oauthError(http.StatusBadRequest, "invalid_grant", desc) }
	code := params.Get("code")
	if code == "" {
		return oauthError(http.StatusBadRequest, "invalid_request", "missing code")
	}
	c, ok := p.codes[code]
	if !ok {
		return bad("unknown or used authorization code")
	}
	delete(p.codes, code) // single use, even when the exchange fails
	switch {
	case !p.nowLocked().Before(c.expiry):
		return bad("authorization code expired")
	case params.Get("redirect_uri") != c.redirectURI:
		return bad("redirect_uri does not match")
	case c.challenge != "" && !verifierMatches(params.Get("code_verifier"), c.challenge, c.method):
		return bad("code_verifier does not match")
	}
	fam := p.newFamilyLocked(c.scope)
	at, exp := p.issueAccessLocked(fam)
	p.stats.AuthCodeExchanges++
	return p.tokenReplyLocked(fam, at, exp, fam.current)
}

func verifierMatches(verifier, challenge, method string) bool {
	if verifier == "" {
		return false
	}
	want := verifier
	if method == "S256" {
		sum := sha256.Sum256([]byte(verifier))
		want = base64.RawURLEncoding.EncodeToString(sum[:])
	}
	return subtle.ConstantTimeCompare([]byte(want), []byte(challenge)) == 1
}

// handleAuthorize consents at once, as there is no user to ask, unless
// Config.ConsentPage asks for a page a browser test can click through.
func (p *IdP) handleAuthorize(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	c, redirect, rep, ok := p.authRequest(q)
	if !ok {
		writeJSON(w, rep)
		return
	}
	if p.cfg.ConsentPage {
		p.renderConsent(w, q)
		return
	}
	redirectBack(w, r, redirect, "code", p.issueCode(c), q.Get("state"))
}

// handleConsent takes the consent page's answer. The form echoes the
// original request, which is validated again: the browser may have changed it.
func (p *IdP) handleConsent(w http.ResponseWriter, r *http.Request) {
	r.Body = http.MaxBytesReader(w, r.Body, 1<<20)
	if err := r.ParseForm(); err != nil {
		writeJSON(w, oauthError(http.StatusBadRequest, "invalid_request", "malformed form body"))
		return
	}
	q := r.PostForm
	c, redirect, rep, ok := p.authRequest(q)
	if !ok {
		writeJSON(w, rep)
		return
	}
	switch q.Get("decision") {
	case "allow":
		redirectBack(w, r, redirect, "code", p.issueCode(c), q.Get("state"))
	case "deny":
		redirectBack(w, r, redirect, "error", "access_denied", q.Get("state")) // RFC 6749 4.1.2.1
	default:
		writeJSON(w, oauthError(http.StatusBadRequest, "invalid_request", "decision must be allow or deny"))
	}
}

// authRequest validates the parameters of an authorization request and
// returns the code they would be granted (without expiry) and the parsed
// redirect_uri. When ok is false, rep is the error to answer with.
func (p *IdP) authRequest(q url.Values) (c *authCode, redirect *url.URL, rep reply, ok bool) {
	fail := func(code, desc string) (*authCode, *url.URL, reply, bool) {
		return nil, nil, oauthError(http.StatusBadRequest, code, desc), false
	}
	if q.Get("client_id") != p.cfg.ClientID {
		return fail("invalid_client", "unknown client_id")
	}
	redirect, err := url.Parse(q.Get("redirect_uri"))
	if err != nil || !redirect.IsAbs() {
		return fail("invalid_request", "redirect_uri must be an absolute URL")
	}
	if q.Get("response_type") != "code" {
		return fail("unsupported_response_type", "only response_type=code is supported")
	}
	method := q.Get("code_challenge_method")
	challenge := q.Get("code_challenge")
	if challenge != "" && method == "" {
		method = "plain" // RFC 7636 4.3
	}
	if challenge != "" && method != "S256" && method != "plain" {
		return fail("invalid_request", "unsupported code_challenge_method")
	}
	c = &authCode{redirectURI: q.Get("redirect_uri"), scope: q.Get("scope"), challenge: challenge, method: method}
	return c, redirect, reply{}, true
}

// issueCode stores c under a new single-use authorization code.
func (p *IdP) issueCode(c *authCode) string {
	code := "fake-code-" + randomString(24)
	p.mu.Lock()
	defer p.mu.Unlock()
	c.expiry = p.nowLocked().Add(codeTTL)
	p.codes[code] = c
	return code
}

// redirectBack sends the browser to the client's redirect URI with key=value
// and the state added to the URI's own query. A POST gets 303 so the
// browser follows with a GET.
func redirectBack(w http.ResponseWriter, r *http.Request, redirect *url.URL, key, value, state string) {
	rq := redirect.Query()
	rq.Set(key, value)
	if state != "" {
		rq.Set("state", state)
	}
	redirect.RawQuery = rq.Encode()
	status := http.StatusFound
	if r.Method == http.MethodPost {
		status = http.StatusSeeOther
	}
	http.Redirect(w, r, redirect.String(), status)
}

// consentTmpl is the consent page. The hidden fields carry the original
// request back, so the POST needs no server-side session.
var consentTmpl = template.Must(template.New("consent").Parse(`<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>Fake IdP: consent</title></head>
<body>
<h1>Fake IdP: consent</h1>
<p>Client <code id="client-id">{{.ClientID}}</code> asks for:</p>
<ul id="scopes">{{range .Scopes}}<li>{{.}}</li>{{else}}<li>no scopes</li>{{end}}</ul>
<form method="post" action="{{.Action}}">
{{- range $k, $vs := .Params}}{{range $vs}}
<input type="hidden" name="{{$k}}" value="{{.}}">{{end}}{{end}}
<button id="allow" name="decision" value="allow">Allow</button>
<button id="deny" name="decision" value="deny">Deny</button>
</form>
</body>
</html>
`))

// renderConsent shows the consent page for the validated request q.
func (p *IdP) renderConsent(w http.ResponseWriter, q url.Values) {
	params := maps.Clone(q)
	params.Del("decision") // the buttons' own field; an echoed one would win
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	_ = consentTmpl.Execute(w, struct {
		ClientID, Action string
		Scopes           []string
		Params           url.Values
	}{q.Get("client_id"), authorizePath, strings.Fields(q.Get("scope")), params})
}

func (p *IdP) handleAPI(w http.ResponseWriter, r *http.Request) {
	at, ok := bearer(r)
	p.mu.Lock()
	var accountID string
	if c := p.challenge; c != "" {
		p.stats.API401++
		p.mu.Unlock()
		w.Header().Set("WWW-Authenticate", c)
		writeJSON(w, reply{status: http.StatusUnauthorized, body: map[string]any{"code": 401, "message": "Unauthorized; scope does not match"}})
		return
	}
	if ok && p.accessValidLocked(at) {
		accountID = p.access[at].fam.id
		p.stats.API200++
	} else {
		p.stats.API401++
	}
	p.mu.Unlock()
	if accountID == "" {
		w.Header().Set("WWW-Authenticate", `Bearer error="invalid_token"`)
		writeJSON(w, reply{status: http.StatusUnauthorized, body: map[string]any{"code": 401, "message": "Unauthorized"}})
		return
	}
	writeJSON(w, reply{status: http.StatusOK, body: map[string]string{"accountId": accountID, "displayName": "Fake User"}})
}

func (p *IdP) handleStats(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, reply{status: http.StatusOK, body: p.Stats()})
}

// tokenParams reads the token request from a form body or, as Atlassian
// also accepts, a JSON object body.
func tokenParams(w http.ResponseWriter, r *http.Request) (url.Values, error) {
	r.Body = http.MaxBytesReader(w, r.Body, 1<<20)
	mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if mt != "application/json" {
		if err := r.ParseForm(); err != nil {
			return nil, fmt.Errorf("malformed form body")
		}
		return r.PostForm, nil
	}
	var obj map[string]any
	if err := json.NewDecoder(r.Body).Decode(&obj); err != nil {
		return nil, fmt.Errorf("malformed JSON body")
	}
	v := url.Values{}
	for k, val := range obj {
		if s, ok := val.(string); ok {
			v.Set(k, s)
		}
	}
	_, _ = io.Copy(io.Discard, r.Body)
	return v, nil
}

func bearer(r *http.Request) (string, bool) {
	scheme, tok, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") || tok == "" {
		return "", false
	}
	return tok, true
}

// dropConnection closes the connection without writing a byte, so the client
// sees a network error after the IdP has acted on the request.
func dropConnection(w http.ResponseWriter) {
	if hj, ok := w.(http.Hijacker); ok {
		if conn, _, err := hj.Hijack(); err == nil {
			_ = conn.Close()
			return
		}
	}
	// HTTP/2 and wrapped writers cannot be hijacked; aborting the handler
	// resets the stream or closes the connection without a response.
	panic(http.ErrAbortHandler)
}

func unescape(s string) string {
	if u, err := url.QueryUnescape(s); err == nil {
		return u
	}
	return s
}

// ceilSeconds rounds d up to whole seconds; negative durations give 0.
func ceilSeconds(d time.Duration) int64 {
	if d <= 0 {
		return 0
	}
	return int64((d + time.Second - 1) / time.Second)
}
