package tokenmgr

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"time"

	"golang.org/x/oauth2"
)

// policy is the Manager's timing and classification, as pure functions of a
// record, a time and the options: when a token is due, when it stops being
// served, how long to back off, what a provider error means. Nothing here
// touches Redis or the provider, so all of it is table-tested.
type policy struct {
	refreshBefore time.Duration // RefreshBefore
	maxFraction   float64       // MaxRefreshFraction
	minForcedAge  time.Duration // MinForcedRefreshAge
	maxBackoff    time.Duration // MaxBackoff
}

func newPolicy(o Options) policy {
	return policy{refreshBefore: o.RefreshBefore, maxFraction: o.MaxRefreshFraction, minForcedAge: o.MinForcedRefreshAge, maxBackoff: o.MaxBackoff}
}

// farFuture stands for "never" in deadlines of tokens without expiry.
var farFuture = time.Unix(1<<40, 0)

// deadlines returns when rec's token is due for refresh (soft), when a
// worker refreshes it even though a live refresher serves the grant
// (floor), and when it stops being served (hard). The refresh margin is
// scaled by spread in [0.5, 1]: each Manager picks its soft deadline in the
// later half of the margin, so a fleet does not rush the lease at one
// instant: the first one refreshes and the others hear the rotation before
// their turn. spread 1 is the full margin. The floor is the last 30% of the
// margin, after every soft deadline and before the hard one.
func (p policy) deadlines(rec *record, spread float64) (soft, floor, hard time.Time) {
	if rec.Expiry.IsZero() {
		return farFuture, farFuture, farFuture
	}
	margin := p.margin(rec)
	skew := min(10*time.Second, margin/4)
	hard = rec.Expiry.Add(-skew)
	floor = rec.Expiry.Add(-time.Duration(float64(margin) * floorFraction))
	soft = rec.Expiry.Add(-time.Duration(float64(margin) * spread))
	return soft, floor, hard
}

// floorFraction places the floor: the last 30% of the refresh margin.
const floorFraction = 0.3

// randomSpread is the spread a Manager gives its own deadlines.
func randomSpread() float64 { return 0.5 + 0.5*rand.Float64() }

// margin is RefreshBefore, capped at MaxRefreshFraction of the token's
// lifetime, so short tokens are not refreshed the moment they are issued.
func (p policy) margin(rec *record) time.Duration {
	margin := p.refreshBefore
	if !rec.RotatedAt.IsZero() {
		if life := rec.Expiry.Sub(rec.RotatedAt); life > 0 {
			margin = min(margin, time.Duration(float64(life)*p.maxFraction))
		}
	}
	return margin
}

// due reports whether rec should be refreshed now (full margin, no spread).
func (p policy) due(rec *record, now time.Time) bool {
	soft, _, _ := p.deadlines(rec, 1)
	return !now.Before(soft)
}

// usable reports whether rec's token may still be served.
func (p policy) usable(rec *record, now time.Time) bool {
	_, _, hard := p.deadlines(rec, 1)
	return rec.Status == StatusOK && now.Before(hard)
}

// needsRefresh reports whether rec must be refreshed for a caller who
// wants w.
func (p policy) needsRefresh(rec *record, w want, now time.Time) bool {
	if w.rejects() {
		// The 401 rule: only the version the caller saw rejected, and not
		// one written moments ago (a 401 for some other reason must not
		// turn every request into a refresh).
		return rec.V == w.rejected && (w.mode == wantForced || now.Sub(rec.RotatedAt) >= p.minForcedAge || !p.usable(rec, now))
	}
	return p.due(rec, now)
}

// backoff is exponential in the fleet-wide attempt count, capped.
func (p policy) backoff(attempts int64) time.Duration {
	d := time.Second
	for i := int64(1); i < attempts && d < p.maxBackoff; i++ {
		d *= 2
	}
	return min(d, p.maxBackoff)
}

// jitter returns a duration in [d/2, d).
func jitter(d time.Duration) time.Duration {
	return d/2 + time.Duration(rand.Int64N(int64(d/2)+1))
}

// failClass is what a failed refresh call means.
type failClass int

const (
	failTransient failClass = iota // 5xx, 429, network: back off and retry
	failDead                       // invalid_grant: the refresh token is not accepted
	failConfig                     // the client itself is rejected
)

// classify reads a token endpoint error, by RFC 6749 section 5.2's error
// codes (the table in docs/design.md). now is the wall clock, for a
// Retry-After given as an HTTP date.
//
//   - invalid_grant: the refresh token is refused; re-checked against Redis,
//     then the grant is dead.
//   - invalid_client, unauthorized_client, and Atlassian's access_denied for
//     a wrong secret: the client itself is refused, a configuration error.
//   - everything else, invalid_request and unknown codes included (Ory
//     Hydra answers invalid_request to concurrent requests under load, and
//     a retry succeeds), 429, 5xx and network errors: transient.
func classify(err error, now time.Time) (class failClass, retryAfter time.Duration) {
	var redirect *RedirectError
	if errors.As(err, &redirect) {
		return failConfig, 0
	}
	var re *oauth2.RetrieveError
	if !errors.As(err, &re) {
		return failTransient, 0
	}
	if re.Response != nil {
		retryAfter = parseRetryAfter(re.Response.Header.Get("Retry-After"), now)
	}
	switch re.ErrorCode {
	case "invalid_grant":
		return failDead, 0
	case "invalid_client", "unauthorized_client", "access_denied":
		return failConfig, retryAfter
	}
	return failTransient, retryAfter
}

// retryInLease reports whether a failed call is worth repeating at once,
// under the same lease: the provider answered a client error that is not
// about the token or the client (invalid_request, an unknown code) and did
// not rotate. A rate limit or a server error backs the fleet off instead.
func retryInLease(err error) bool {
	var re *oauth2.RetrieveError
	if !errors.As(err, &re) || re.Response == nil || !definiteAnswer(err) {
		return false
	}
	code := re.Response.StatusCode
	class, _ := classify(err, time.Time{})
	return class == failTransient && code >= 400 && code < 500 && code != http.StatusTooManyRequests
}

// The retries inside one lease: at most retriesInLease more calls, after
// a jittered pause that doubles from retryInLeasePause.
const (
	retriesInLease    = 2
	retryInLeasePause = 250 * time.Millisecond
)

// definiteAnswer reports whether a failed call certainly did not rotate the
// token: the provider answered with an OAuth error or a rate limit, or the
// request never left (no connection, a certificate refused). Anything else
// (a timeout, a reset connection, a lost answer, a gateway's 5xx without an
// OAuth error) may have followed a rotation: the token is in doubt.
func definiteAnswer(err error) bool {
	var re *oauth2.RetrieveError
	if errors.As(err, &re) {
		if re.Response == nil {
			return false
		}
		return re.ErrorCode != "" || re.Response.StatusCode == http.StatusTooManyRequests ||
			(re.Response.StatusCode >= 400 && re.Response.StatusCode < 500)
	}
	var op *net.OpError
	var redirect *RedirectError
	if errors.As(err, &op) && op.Op == "dial" || errors.As(err, &redirect) {
		return true // the request never reached the token endpoint itself
	}
	var unknownCA x509.UnknownAuthorityError
	var hostname x509.HostnameError
	var invalid x509.CertificateInvalidError
	var verify *tls.CertificateVerificationError
	return errors.As(err, &unknownCA) || errors.As(err, &hostname) || errors.As(err, &invalid) || errors.As(err, &verify)
}

// The bounds on times a provider gives (invariant 12): an access token
// that claims to live less than minAccessTTL (expires_in 0 or negative)
// would be refreshed in a loop; one that claims years would never be; a
// Retry-After of years would stop the fleet. The lower bound is a second,
// not more: a short-lived token is served only as long as the provider
// says it lives.
const (
	minAccessTTL  = time.Second
	maxAccessTTL  = 24 * time.Hour
	maxRetryAfter = time.Hour
)

// clampAccessTTL bounds a token lifetime; clamped reports a change.
func clampAccessTTL(d time.Duration) (ttl time.Duration, clamped bool) {
	ttl = min(max(d, minAccessTTL), maxAccessTTL)
	return ttl, ttl != d
}

// Forced refreshes (a 401 on the newest version) back off per grant while
// 401s persist: after the n-th in a row, the next waits
// forcedBackoffStart x 2^(n-1), at most forcedBackoffMax.
const (
	forcedBackoffStart = 30 * time.Second
	forcedBackoffMax   = 10 * time.Minute
)

func forcedBackoff(streak int64) time.Duration {
	d := forcedBackoffStart
	for i := int64(1); i < streak && d < forcedBackoffMax; i++ {
		d *= 2
	}
	return min(d, forcedBackoffMax)
}

// parseRetryAfter reads delay-seconds or an HTTP date; 0 if absent or bad.
func parseRetryAfter(v string, now time.Time) time.Duration {
	if v == "" {
		return 0
	}
	if s, err := strconv.Atoi(v); err == nil && s >= 0 {
		return time.Duration(s) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil && t.After(now) {
		return t.Sub(now)
	}
	return 0
}
