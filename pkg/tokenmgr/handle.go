package tokenmgr

import (
	"context"
	"net/http"
	"time"

	"golang.org/x/oauth2"
)

// Grant is one grant of a Manager with its name bound once, for code that
// serves one grant: keep it instead of passing the name on every call. Get
// it from Manager.Grant. It is safe for concurrent use; a Grant whose name
// is invalid returns that error from every method.
type Grant struct {
	m    *Manager
	name string
	g    *grantState // nil when the name is invalid
	err  error       // why the name is invalid
}

// Name is the grant's name.
func (h *Grant) Name() string { return h.name }

// Token returns a valid access token, as Manager.Token does, without the
// name lookup.
func (h *Grant) Token(ctx context.Context) (*oauth2.Token, error) {
	e, err := h.current(ctx)
	if err != nil {
		return nil, err
	}
	return e.tok, nil
}

func (h *Grant) current(ctx context.Context) (*entry, error) {
	if h.err != nil {
		return nil, h.err
	}
	return h.m.current(ctx, h.g)
}

// Status reads the grant's metadata from Redis, as Manager.Status does.
func (h *Grant) Status(ctx context.Context) (GrantStatus, error) {
	return h.m.Status(ctx, h.name)
}

// Client returns an *http.Client that authorizes every request with the
// grant's current token and applies the 401 rule (see Transport).
//
// Timeouts: by default the client has none of its own, like
// http.DefaultClient; bound each request with its context. The wait for a
// token (while another process refreshes) counts against the request's
// context, and is bounded by Options.WaitTimeout besides. WithTimeout sets
// http.Client.Timeout, which then bounds the whole request: the token, the
// API call, a retry after a 401, and reading the body.
func (h *Grant) Client(opts ...ClientOption) *http.Client {
	c := &http.Client{Transport: h.Transport(nil)}
	for _, o := range opts {
		o(c)
	}
	return c
}

// ClientOption adjusts a Client.
type ClientOption func(*http.Client)

// WithTimeout bounds every request made through the client, from waiting
// for a token to reading the answer's body (http.Client.Timeout).
func WithTimeout(d time.Duration) ClientOption {
	return func(c *http.Client) { c.Timeout = d }
}

// Transport returns a RoundTripper that authorizes requests with the
// grant's token through base (http.DefaultTransport if nil), and applies
// the 401 rule (invariant 5): if Redis holds a newer version than the one
// the request used, the request is retried once with it; if not, one
// fenced, fleet-wide refresh of that version runs and the request is
// retried with its result. A request whose body cannot be replayed (no
// GetBody) is not retried: its 401 is returned, and the next request gets
// the new token.
func (h *Grant) Transport(base http.RoundTripper) http.RoundTripper {
	if base == nil {
		base = http.DefaultTransport
	}
	return &transport{h: h, base: base}
}

// TokenSource returns an oauth2.TokenSource for the grant, usable with
// oauth2.NewClient. Because oauth2.TokenSource.Token takes no context, the
// source waits at most WaitTimeout and stops with the Manager.
//
// oauth2.NewClient wraps a source in oauth2.ReuseTokenSource, which keeps a
// token until 10 seconds before its Expiry, long after a rotation revoked
// it. So each token this source returns is a copy whose Expiry is at most
// 11 seconds away (never later than the real one): the wrapper asks again
// about every second, and each ask is an atomic load. Prefer Client, which
// needs no such trick and applies the 401 rule.
func (h *Grant) TokenSource() oauth2.TokenSource {
	return &tokenSource{h: h}
}

// Client is Grant(grant).Client(opts...).
func (m *Manager) Client(grant string, opts ...ClientOption) *http.Client {
	return m.Grant(grant).Client(opts...)
}

// Transport is Grant(grant).Transport(base).
func (m *Manager) Transport(grant string, base http.RoundTripper) http.RoundTripper {
	return m.Grant(grant).Transport(base)
}

// TokenSource is Grant(grant).TokenSource().
func (m *Manager) TokenSource(grant string) oauth2.TokenSource { return m.Grant(grant).TokenSource() }
