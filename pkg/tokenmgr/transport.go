package tokenmgr

import (
	"context"
	"io"
	"net/http"
	"strings"
	"time"

	"go.opentelemetry.io/otel/attribute"
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
	m := t.h.m
	if err != nil || resp.StatusCode != http.StatusUnauthorized {
		if err == nil {
			t.h.g.forcedStreak.Store(0) // 401s stopped: forced refreshes start afresh
		}
		return resp, err
	}
	m.stats.unauthorized.Add(1)
	reason, insufficientScope := challenge(resp.Header)
	ctx, span := m.startSpan(ctx, "tokenmgr.unauthorized", t.h.g, attribute.Int64("tokenmgr.version", e.v),
		attribute.String("tokenmgr.challenge", reason), attribute.Bool("tokenmgr.insufficient_scope", insufficientScope))
	outcome := "returned"
	defer func() {
		span.SetAttributes(attribute.String("tokenmgr.outcome", outcome))
		span.End()
	}()
	if insufficientScope {
		// RFC 6750: the token is valid but lacks a scope; no refresh can
		// cure that.
		m.stats.unauthorizedAfterRetry.Add(1)
		return resp, nil
	}
	replayable := req.Body == nil || req.Body == http.NoBody || req.GetBody != nil
	// One retry with a newer version; a second only if that version was
	// itself superseded meanwhile (a rotation landing between the two).
	for retry := 0; retry < 2; retry++ {
		next, nerr := m.obtain(ctx, t.h.g, want{mode: wantNewer, rejected: e.v, reason: reason})
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
			if err == nil {
				t.h.g.forcedStreak.Store(0)
				outcome = "cured"
			}
			return resp, err
		}
		m.stats.unauthorized.Add(1)
		if reason, insufficientScope = challenge(resp.Header); insufficientScope {
			break
		}
		e = next
	}
	m.stats.unauthorizedAfterRetry.Add(1)
	return resp, nil
}

// maxChallenge bounds the 401 challenge kept as a reason: it is stored in
// the record (forced_401), where an operator reads it.
const maxChallenge = 200

// challenge reads a 401's WWW-Authenticate (RFC 6750 section 3): the
// reason its refresh is keyed on (the error code and description, or the
// challenge as given), and whether it is insufficient_scope, which no
// refresh cures.
func challenge(h http.Header) (reason string, insufficientScope bool) {
	v := strings.TrimSpace(h.Get("WWW-Authenticate"))
	code, desc := authParam(v, "error"), authParam(v, "error_description")
	if code != "" {
		v = strings.TrimSpace(code + " " + desc)
	}
	return bounded(v, maxChallenge), strings.EqualFold(code, "insufficient_scope")
}

// authParam returns the value of one auth-param (name=token or
// name="quoted") of a challenge, or "". Names match without regard to
// ASCII case; the lowered copy keeps every byte where it was (strings.ToLower
// would not: it turns an invalid byte into three, and the indexes into the
// challenge would run past its end).
func authParam(challenge, name string) string {
	lower := asciiLower(challenge)
	for i := 0; ; {
		j := strings.Index(lower[i:], name+"=")
		if j < 0 {
			return ""
		}
		j += i
		if j > 0 && lower[j-1] != ' ' && lower[j-1] != ',' {
			i = j + len(name)
			continue
		}
		rest := challenge[j+len(name)+1:]
		if strings.HasPrefix(rest, `"`) {
			if end := strings.IndexByte(rest[1:], '"'); end >= 0 {
				return rest[1 : 1+end]
			}
			return rest[1:]
		}
		if end := strings.IndexAny(rest, ", "); end >= 0 {
			return rest[:end]
		}
		return rest
	}
}

// asciiLower lowers the ASCII letters of s and leaves every other byte as
// it is, so that an index into the result is one into s.
func asciiLower(s string) string {
	b := []byte(s)
	for i, c := range b {
		if 'A' <= c && c <= 'Z' {
			b[i] = c + 'a' - 'A'
		}
	}
	return string(b)
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
