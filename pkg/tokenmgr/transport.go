package tokenmgr

import (
	"context"
	"io"
	"net/http"

	"golang.org/x/oauth2"
)

// TokenSource returns an oauth2.TokenSource for grant, usable with
// oauth2.NewClient. Because oauth2.TokenSource.Token takes no context, the
// source waits at most WaitTimeout and stops with the Manager; prefer
// Manager.Client, which uses each request's context and applies the 401
// rule.
func (m *Manager) TokenSource(grant string) oauth2.TokenSource {
	return &tokenSource{m: m, grant: grant}
}

type tokenSource struct {
	m     *Manager
	grant string
}

func (s *tokenSource) Token() (*oauth2.Token, error) {
	// The one place a context is made here rather than passed in: the
	// oauth2.TokenSource interface has none.
	ctx, cancel := context.WithTimeout(s.m.base, s.m.opts.WaitTimeout)
	defer cancel()
	return s.m.Token(ctx, s.grant)
}

// Client returns an *http.Client that authorizes every request with grant's
// current token and applies the 401 rule (see Transport).
func (m *Manager) Client(grant string) *http.Client {
	return &http.Client{Transport: m.Transport(grant, nil)}
}

// Transport returns a RoundTripper that authorizes requests with grant's
// token through base (http.DefaultTransport if nil).
//
// On a 401 it applies the 401 rule (DESIGN.md invariant 5): if Redis holds
// a newer version than the one the request used, the request is retried
// once with it; if not, one fenced, fleet-wide refresh of that version runs
// and the request is retried with its result. A request whose body cannot
// be replayed (no GetBody) is not retried: its 401 is returned, and the
// next request gets the new token.
func (m *Manager) Transport(grant string, base http.RoundTripper) http.RoundTripper {
	if base == nil {
		base = http.DefaultTransport
	}
	return &transport{m: m, grant: grant, base: base}
}

type transport struct {
	m     *Manager
	grant string
	base  http.RoundTripper
}

func (t *transport) RoundTrip(req *http.Request) (*http.Response, error) {
	ctx := req.Context()
	e, err := t.m.current(ctx, t.grant)
	if err != nil {
		closeBody(req)
		return nil, err
	}
	resp, err := t.base.RoundTrip(authorized(req, e.tok, req.Body))
	if err != nil || resp.StatusCode != http.StatusUnauthorized {
		return resp, err
	}
	t.m.stats.unauthorized.Add(1)
	replayable := req.Body == nil || req.Body == http.NoBody || req.GetBody != nil
	g := t.m.lookup(t.grant)
	next, nerr := t.m.obtain(ctx, g, need{staleV: e.v})
	if nerr != nil || next.v == e.v || !replayable {
		// Nothing newer, or the body is gone: the caller gets the 401,
		// and later requests the token the refresh produced.
		return resp, nil
	}
	body := req.Body
	if req.GetBody != nil {
		if body, err = req.GetBody(); err != nil {
			return resp, nil
		}
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	resp, err = t.base.RoundTrip(authorized(req, next.tok, body))
	if err == nil && resp.StatusCode == http.StatusUnauthorized {
		t.m.stats.unauthorizedAfterRetry.Add(1)
	}
	return resp, err
}

// authorized clones req (a RoundTripper must not modify its request) with
// the token's Authorization header and the given body.
func authorized(req *http.Request, tok *oauth2.Token, body io.ReadCloser) *http.Request {
	r := req.Clone(req.Context())
	r.Body = body
	tok.SetAuthHeader(r)
	return r
}

func closeBody(req *http.Request) {
	if req.Body != nil {
		req.Body.Close()
	}
}
