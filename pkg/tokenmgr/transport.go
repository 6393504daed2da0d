package tokenmgr

import (
	"context"
	"io"
	"net/http"
	"time"

	"golang.org/x/oauth2"
)

type tokenSource struct{ h *Grant }

// reuseHorizon is how far ahead TokenSource tokens claim to expire.
const reuseHorizon = 11 * time.Second

func (s *tokenSource) Token() (*oauth2.Token, error) {
	// The one place a context is made here rather than passed in: the
	// oauth2.TokenSource interface has none.
	ctx, cancel := context.WithTimeout(s.h.m.base, s.h.m.opts.WaitTimeout)
	defer cancel()
	tok, err := s.h.Token(ctx)
	if err != nil {
		return nil, err
	}
	t := *tok
	if horizon := time.Now().Add(reuseHorizon); t.Expiry.IsZero() || t.Expiry.After(horizon) {
		t.Expiry = horizon
	}
	return &t, nil
}

// transport is Grant.Transport: the token on every request, and the 401
// rule.
type transport struct {
	h    *Grant
	base http.RoundTripper
}

func (t *transport) RoundTrip(req *http.Request) (*http.Response, error) {
	ctx := req.Context()
	e, err := t.h.current(ctx)
	if err != nil {
		closeBody(req)
		return nil, err
	}
	resp, err := t.base.RoundTrip(authorized(req, e.tok, req.Body))
	if err != nil || resp.StatusCode != http.StatusUnauthorized {
		return resp, err
	}
	m := t.h.m
	m.stats.unauthorized.Add(1)
	replayable := req.Body == nil || req.Body == http.NoBody || req.GetBody != nil
	// One retry with a newer version; a second only if that version was
	// itself superseded meanwhile (a rotation landing between the two).
	for retry := 0; retry < 2; retry++ {
		next, nerr := m.obtain(ctx, t.h.g, want{mode: wantNewer, rejected: e.v})
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
		m.stats.unauthorized.Add(1)
		e = next
	}
	m.stats.unauthorizedAfterRetry.Add(1)
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
