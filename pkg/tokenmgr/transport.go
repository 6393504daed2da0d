package tokenmgr

import (
	"context"
	"io"
	"net/http"
	"time"

	"golang.org/x/oauth2"
)

// TokenSource returns an oauth2.TokenSource for grant, usable with
// oauth2.NewClient. Because oauth2.TokenSource.Token takes no context, the
// source waits at most WaitTimeout and stops with the Manager.
//
// oauth2.NewClient wraps a source in oauth2.ReuseTokenSource, which keeps a
// token until 10 seconds before its Expiry, long after a rotation revoked
// it. So each token this source returns is a copy whose Expiry is at most
// 11 seconds away (never later than the real one): the wrapper asks again
// about every second, and each ask is an atomic load. Prefer
// Manager.Client, which needs no such trick and applies the 401 rule.
func (m *Manager) TokenSource(grant string) oauth2.TokenSource {
	return &tokenSource{m: m, grant: grant}
}

type tokenSource struct {
	m     *Manager
	grant string
}

// reuseHorizon is how far ahead TokenSource tokens claim to expire.
const reuseHorizon = 11 * time.Second

func (s *tokenSource) Token() (*oauth2.Token, error) {
	// The one place a context is made here rather than passed in: the
	// oauth2.TokenSource interface has none.
	ctx, cancel := context.WithTimeout(s.m.base, s.m.opts.WaitTimeout)
	defer cancel()
	tok, err := s.m.Token(ctx, s.grant)
	if err != nil {
		return nil, err
	}
	t := *tok
	if horizon := time.Now().Add(reuseHorizon); t.Expiry.IsZero() || t.Expiry.After(horizon) {
		t.Expiry = horizon
	}
	return &t, nil
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
	// One retry with a newer version; a second only if that version was
	// itself superseded meanwhile (a rotation landing between the two).
	for retry := 0; retry < 2; retry++ {
		next, nerr := t.m.obtain(ctx, g, need{staleV: e.v})
		if nerr != nil || next.v == e.v || !replayable {
			// Nothing newer, or the body is gone: the caller gets the
			// 401, and later requests the token the refresh produced.
			break
		}
		body := req.Body
		if req.GetBody != nil {
			if body, err = req.GetBody(); err != nil {
				break
			}
		}
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		resp.Body.Close()
		resp, err = t.base.RoundTrip(authorized(req, next.tok, body))
		if err != nil || resp.StatusCode != http.StatusUnauthorized {
			return resp, err
		}
		t.m.stats.unauthorized.Add(1)
		e = next
	}
	t.m.stats.unauthorizedAfterRetry.Add(1)
	return resp, nil
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
