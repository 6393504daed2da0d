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
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// The operator surface (dashboard, its JSON and /connect) is off unless
// an operator asks for it: credentials, or a separate operator listener
// (--admin-listen). Whoever reaches /connect can replace a grant with
// another consent, so without credentials that listener must be loopback
// (reached with kubectl port-forward or an SSH tunnel).
const (
	envPassword  = "TOKENMGR_ADMIN_PASSWORD"
	envToken     = "TOKENMGR_ADMIN_TOKEN"
	minSecretLen = 12
	csrfCookie   = "tokenmgr_csrf"
	csrfField    = "csrf"
)

// credentials are the operator's: HTTP basic auth as user admin with the
// password, or the bearer token. Either may be empty.
type credentials struct {
	password, token string
}

// none reports whether no credentials are set.
func (c credentials) none() bool { return c.password == "" && c.token == "" }

// readSecret reads a credential from file, else from the environment.
// What it returns is the trimmed secret; errors never contain it.
func readSecret(file, envName string, env func(string) string) (string, error) {
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
	return err == nil && loopbackHost(host)
}

// validateOperator checks the operator surface's flags: credential lengths,
// and that an operator listener without credentials is loopback.
func (c *runConfig) validateOperator() []error {
	var errs []error
	for _, s := range []struct{ name, val string }{
		{"admin password (--admin-password-file or " + envPassword + ")", c.creds.password},
		{"admin token (--admin-token-file or " + envToken + ")", c.creds.token},
	} {
		if s.val != "" && len(s.val) < minSecretLen {
			errs = append(errs, fmt.Errorf("the %s must have %d+ characters", s.name, minSecretLen))
		}
	}
	creds := !c.creds.none()
	if c.operatorListen != "" {
		if c.operatorListen == c.listen {
			errs = append(errs, errors.New("--admin-listen must differ from --listen (leave it unset to serve the dashboard on --listen behind credentials)"))
		}
		if !creds && !isLoopback(c.operatorListen) {
			errs = append(errs, fmt.Errorf("--admin-listen %s: without admin credentials it must be a loopback address (127.0.0.1:PORT, [::1]:PORT, localhost:PORT); set --admin-password-file or --admin-token-file to serve it elsewhere", c.operatorListen))
		}
	}
	if c.redirectURL != "" && !c.operatorOn() {
		errs = append(errs, errors.New("/connect (enabled by --redirect-url) needs the operator surface: set --admin-password-file, --admin-token-file ("+envPassword+", "+envToken+") or a loopback --admin-listen; anyone who can open /connect can replace a grant"))
	}
	return errs
}

// operatorOn reports whether the dashboard and /connect are served.
func (c *runConfig) operatorOn() bool {
	return c.operatorListen != "" || c.creds.password != "" || c.creds.token != ""
}

// gate guards the operator surface: it checks the credentials and
// throttles wrong guesses.
type gate struct {
	creds credentials // none: the surface is on a loopback listener
	// proxies are the reverse proxies whose X-Forwarded-For names the
	// client (--admin-trusted-proxies); without them all clients behind
	// one proxy share its failure budget.
	proxies []netip.Prefix
	// now is the clock the failure budgets refill by (the Managers').
	now func() time.Time

	mu sync.Mutex
	// sources limits wrong credentials per client address (an IPv6 /64
	// counts as one), not requests: the dashboard's polling is never
	// throttled, guessing is, and a guesser elsewhere cannot lock the
	// operator out.
	sources  map[string]*source
	overflow *source // shared by new sources while the map is full of active ones
}

// source is one client address's failure budget. mu makes check, verify
// and charge one step, so parallel guesses cannot all pass the check.
type source struct {
	mu  sync.Mutex
	lim *rate.Limiter
}

const (
	// maxFailureSources bounds the budgets kept. When it is reached, only
	// budgets that have fully refilled are dropped (a throttled guesser
	// keeps its own); new sources then share one budget.
	maxFailureSources = 10000
	failureBurst      = 10
)

func newSource() *source { return &source{lim: rate.NewLimiter(1, failureBurst)} }

func newGate(creds credentials, proxies []netip.Prefix, now func() time.Time) *gate {
	return &gate{creds: creds, proxies: proxies, now: now, sources: map[string]*source{}, overflow: newSource()}
}

// open reports whether no credentials are set: the surface is on a
// loopback listener and the network is the access control.
func (gt *gate) open() bool { return gt.creds.none() }

// equal compares digests, so neither the time taken nor an early length
// mismatch tells anything about the secret.
func equal(got, want string) bool {
	g, w := sha256.Sum256([]byte(got)), sha256.Sum256([]byte(want))
	return subtle.ConstantTimeCompare(g[:], w[:]) == 1
}

// allowed accepts "Authorization: Bearer TOKEN", or basic auth as user
// admin with the password or the token (browsers can send basic auth but
// not bearer tokens).
func (gt *gate) allowed(r *http.Request) bool {
	if gt.open() {
		return true
	}
	if h := r.Header.Get("Authorization"); gt.creds.token != "" && len(h) > 7 && strings.EqualFold(h[:7], "bearer ") {
		return equal(h[7:], gt.creds.token)
	}
	user, pass, ok := r.BasicAuth()
	if !ok || !equal(user, "admin") {
		return false
	}
	return (gt.creds.password != "" && equal(pass, gt.creds.password)) || (gt.creds.token != "" && equal(pass, gt.creds.token))
}

// clientKey names the request's source for the failure budget: the peer
// address or, from a trusted proxy, the nearest untrusted address in
// X-Forwarded-For; IPv6 by /64, which one client usually holds whole.
func (gt *gate) clientKey(r *http.Request) string {
	ip, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	addr := ip.Addr().Unmap()
	if gt.trusted(addr) {
		hops := strings.Split(strings.Join(r.Header.Values("X-Forwarded-For"), ","), ",")
		for i := len(hops) - 1; i >= 0; i-- {
			hop, err := netip.ParseAddr(strings.TrimSpace(hops[i]))
			if err != nil {
				break // unparsable: keep the last address a trusted proxy gave
			}
			addr = hop.Unmap()
			if !gt.trusted(addr) {
				break
			}
		}
	}
	if addr.Is6() {
		p, _ := addr.WithZone("").Prefix(64)
		return p.String()
	}
	return addr.String()
}

func (gt *gate) trusted(addr netip.Addr) bool {
	for _, p := range gt.proxies {
		if p.Contains(addr) {
			return true
		}
	}
	return false
}

// source returns key's failure budget.
func (gt *gate) source(key string) *source {
	gt.mu.Lock()
	defer gt.mu.Unlock()
	if s := gt.sources[key]; s != nil {
		return s
	}
	if len(gt.sources) >= maxFailureSources {
		for k, s := range gt.sources {
			if s.lim.TokensAt(gt.now()) >= failureBurst {
				delete(gt.sources, k)
			}
		}
		if len(gt.sources) >= maxFailureSources {
			return gt.overflow
		}
	}
	s := newSource()
	gt.sources[key] = s
	return s
}

// wrap serves h to operators only. A request without credentials gets the
// login challenge; wrong credentials count against their source, which is
// refused, right credentials included, once it has guessed too often.
func (gt *gate) wrap(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if gt.open() {
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
		src := gt.source(gt.clientKey(r))
		src.mu.Lock()
		now := gt.now()
		throttled := src.lim.TokensAt(now) < 1
		ok := !throttled && gt.allowed(r)
		if !throttled && !ok {
			src.lim.AllowN(now, 1)
		}
		src.mu.Unlock()
		switch {
		case throttled:
			w.Header().Set("Retry-After", "1")
			http.Error(w, "too many failed logins from this address; try again shortly", http.StatusTooManyRequests)
		case ok:
			h.ServeHTTP(w, r)
		default:
			challenge()
		}
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
func (gt *gate) checkHost(h http.Handler) http.Handler {
	if !gt.open() {
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
