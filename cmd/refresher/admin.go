package main

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"

	"golang.org/x/time/rate"
)

// The operator surface (dashboard, its JSON and /connect) is off unless
// an operator asks for it: admin credentials, or a separate admin listener.
// Whoever reaches /connect can replace a grant with another consent, so
// without credentials the admin listener must be loopback (reached with
// kubectl port-forward or an SSH tunnel).
const (
	envAdminPassword = "TOKENMGR_ADMIN_PASSWORD"
	envAdminToken    = "TOKENMGR_ADMIN_TOKEN"
	minAdminSecret   = 12
	csrfCookie       = "tokenmgr_csrf"
	csrfField        = "csrf"
)

// adminSecret reads a credential from file, else from the environment.
// What it returns is the trimmed secret; errors never contain it.
func adminSecret(file, envName string, env func(string) string) (string, error) {
	if file == "" {
		return strings.TrimSpace(env(envName)), nil
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(b)), nil
}

// isLoopback reports whether a listen address only accepts local
// connections.
func isLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// validateAdmin checks the operator surface's flags: credential lengths,
// and that an admin listener without credentials is loopback.
func (c *runConfig) validateAdmin() []error {
	var errs []error
	for _, s := range []struct{ name, val string }{
		{"admin password (--admin-password-file or " + envAdminPassword + ")", c.adminPassword},
		{"admin token (--admin-token-file or " + envAdminToken + ")", c.adminToken},
	} {
		if s.val != "" && len(s.val) < minAdminSecret {
			errs = append(errs, fmt.Errorf("the %s must have %d+ characters", s.name, minAdminSecret))
		}
	}
	creds := c.adminPassword != "" || c.adminToken != ""
	if c.adminListen != "" {
		if c.adminListen == c.listen {
			errs = append(errs, errors.New("--admin-listen must differ from --listen (leave it unset to serve the dashboard on --listen behind credentials)"))
		}
		if !creds && !isLoopback(c.adminListen) {
			errs = append(errs, fmt.Errorf("--admin-listen %s: without admin credentials it must be a loopback address (127.0.0.1:PORT, [::1]:PORT, localhost:PORT); set --admin-password-file or --admin-token-file to serve it elsewhere", c.adminListen))
		}
	}
	if c.redirectURL != "" && !c.adminEnabled() {
		errs = append(errs, errors.New("/connect (enabled by --redirect-url) needs the operator surface: set --admin-password-file, --admin-token-file ("+envAdminPassword+", "+envAdminToken+") or a loopback --admin-listen; anyone who can open /connect can replace a grant"))
	}
	return errs
}

// adminEnabled reports whether the dashboard and /connect are served.
func (c *runConfig) adminEnabled() bool {
	return c.adminListen != "" || c.adminPassword != "" || c.adminToken != ""
}

// adminAuth guards the operator surface.
type adminAuth struct {
	password, token string // either may be empty; both empty: no credentials (loopback listener)

	mu sync.Mutex
	// failures limits wrong credentials per client address, not requests:
	// the dashboard's polling is never throttled, guessing is, and a
	// guesser elsewhere cannot lock the operator out.
	failures map[string]*rate.Limiter
}

// maxFailureSources bounds the failure limiters kept; past it they start
// afresh rather than grow without end.
const maxFailureSources = 10000

func newAdminAuth(password, token string) *adminAuth {
	return &adminAuth{password: password, token: token, failures: map[string]*rate.Limiter{}}
}

// open reports whether no credentials are set: the surface is on a
// loopback listener and the network is the access control.
func (a *adminAuth) open() bool { return a.password == "" && a.token == "" }

// equal compares digests, so neither the time taken nor an early length
// mismatch tells anything about the secret.
func equal(got, want string) bool {
	g, w := sha256.Sum256([]byte(got)), sha256.Sum256([]byte(want))
	return subtle.ConstantTimeCompare(g[:], w[:]) == 1
}

// allowed accepts "Authorization: Bearer TOKEN", or basic auth as user
// admin with the password or the token (browsers can send basic auth but
// not bearer tokens).
func (a *adminAuth) allowed(r *http.Request) bool {
	if a.open() {
		return true
	}
	if h := r.Header.Get("Authorization"); a.token != "" && len(h) > 7 && strings.EqualFold(h[:7], "bearer ") {
		return equal(h[7:], a.token)
	}
	user, pass, ok := r.BasicAuth()
	if !ok || !equal(user, "admin") {
		return false
	}
	return (a.password != "" && equal(pass, a.password)) || (a.token != "" && equal(pass, a.token))
}

func (a *adminAuth) limiter(r *http.Request) *rate.Limiter {
	source, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		source = r.RemoteAddr
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	l := a.failures[source]
	if l == nil {
		if len(a.failures) >= maxFailureSources {
			clear(a.failures)
		}
		l = rate.NewLimiter(1, 10)
		a.failures[source] = l
	}
	return l
}

// wrap serves h to operators only. A request without credentials gets the
// login challenge; wrong credentials count against their source, which is
// refused, right credentials included, once it has guessed too often.
func (a *adminAuth) wrap(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if a.open() {
			h.ServeHTTP(w, r)
			return
		}
		challenge := func() {
			w.Header().Set("WWW-Authenticate", `Basic realm="tokenmgr refresher", charset="UTF-8"`)
			http.Error(w, "operator credentials required", http.StatusUnauthorized)
		}
		if r.Header.Get("Authorization") == "" {
			challenge()
			return
		}
		l := a.limiter(r)
		if l.Tokens() < 1 {
			w.Header().Set("Retry-After", "1")
			http.Error(w, "too many failed logins from this address; try again shortly", http.StatusTooManyRequests)
			return
		}
		if a.allowed(r) {
			h.ServeHTTP(w, r)
			return
		}
		l.Allow()
		challenge()
	})
}

// loopbackHost reports whether a request's Host names this machine.
func loopbackHost(host string) bool {
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	host = strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// checkHost, without credentials, refuses requests addressed to another
// name: a page on attacker.example whose DNS is rebound to 127.0.0.1 is
// same-origin with itself, and would otherwise read the dashboard and post
// its forms.
func (a *adminAuth) checkHost(h http.Handler) http.Handler {
	if !a.open() {
		return h
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !loopbackHost(r.Host) {
			http.Error(w, "misdirected request: without admin credentials the dashboard answers only to localhost, 127.0.0.1 or [::1]", http.StatusMisdirectedRequest)
			return
		}
		h.ServeHTTP(w, r)
	})
}

// csrfToken returns the browser's CSRF token, setting a new one when it
// has none. State-changing forms carry it back (double submit); with
// SameSite=Strict and the cross-origin check in front, a foreign page can
// neither send the cookie nor read the token.
func csrfToken(w http.ResponseWriter, r *http.Request, secure bool) string {
	if c, err := r.Cookie(csrfCookie); err == nil && len(c.Value) == 43 {
		return c.Value
	}
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	tok := base64.RawURLEncoding.EncodeToString(b)
	http.SetCookie(w, &http.Cookie{Name: csrfCookie, Value: tok, Path: "/", HttpOnly: true, Secure: secure, SameSite: http.SameSiteStrictMode})
	return tok
}

// csrfValid checks a form's token against the browser's cookie.
func csrfValid(r *http.Request) bool {
	c, err := r.Cookie(csrfCookie)
	return err == nil && c.Value != "" && subtle.ConstantTimeCompare([]byte(c.Value), []byte(r.PostFormValue(csrfField))) == 1
}

// securityHeaders keep the operator pages out of frames (a one-click
// Re-connect must not be clickjacked), caches and other origins' scripts.
func securityHeaders(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hd := w.Header()
		hd.Set("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; frame-ancestors 'none'")
		hd.Set("X-Frame-Options", "DENY")
		hd.Set("X-Content-Type-Options", "nosniff")
		hd.Set("Referrer-Policy", "no-referrer")
		hd.Set("Cache-Control", "no-store")
		h.ServeHTTP(w, r)
	})
}
