package tokenmgr

import (
	"errors"
	"fmt"
	"time"

	"golang.org/x/oauth2"
)

// Sentinel errors for fixed conditions. Match them with errors.Is.
var (
	// ErrReauthRequired means the grant is dead: the provider no longer
	// accepts its refresh token and a human must consent again. Every worker
	// gets it at once, without calling the provider, until the grant is
	// re-seeded. The concrete error is a *ReauthRequiredError with the reason.
	ErrReauthRequired = errors.New("tokenmgr: grant needs re-consent")

	// ErrGrantNotFound means Redis has no record for the grant and no process
	// holds a pair to restore it from. Seed the grant.
	ErrGrantNotFound = errors.New("tokenmgr: no such grant")

	// ErrStoreUnavailable means Redis could not be reached and no usable
	// cached token was left. The concrete error wraps the Redis error.
	ErrStoreUnavailable = errors.New("tokenmgr: token store unavailable")

	// ErrClosed is returned by a Manager after Close.
	ErrClosed = errors.New("tokenmgr: manager closed")
)

// ReauthRequiredError reports a dead grant. It matches ErrReauthRequired.
type ReauthRequiredError struct {
	Grant  string
	Reason string // why the grant was declared dead, as stored in Redis
}

func (e *ReauthRequiredError) Error() string {
	return fmt.Sprintf("tokenmgr: grant %q needs re-consent: %s", e.Grant, e.Reason)
}

// Is makes errors.Is(err, ErrReauthRequired) true.
func (e *ReauthRequiredError) Is(target error) bool { return target == ErrReauthRequired }

// NotFoundError reports a grant with no record. It matches ErrGrantNotFound.
type NotFoundError struct{ Grant string }

func (e *NotFoundError) Error() string {
	return fmt.Sprintf("tokenmgr: no such grant %q (seed it first)", e.Grant)
}

// Is makes errors.Is(err, ErrGrantNotFound) true.
func (e *NotFoundError) Is(target error) bool { return target == ErrGrantNotFound }

// StoreError reports that Redis could not be reached, or refused, while a
// token or a record was needed. It matches ErrStoreUnavailable and unwraps
// to the Redis error; Denied tells a refusal (wrong password, ACL) from an
// outage. It is never reported as a missing grant.
type StoreError struct {
	Grant string
	Op    string
	Err   error
}

func (e *StoreError) Error() string {
	what := "token store unavailable"
	if e.Denied() {
		what = "token store refused the credentials or the command"
	}
	if e.Grant == "" {
		return fmt.Sprintf("tokenmgr: %s: %s: %v", e.Op, what, e.Err)
	}
	return fmt.Sprintf("tokenmgr: grant %q: %s: %s: %v", e.Grant, e.Op, what, e.Err)
}

// Denied reports whether Redis refused the credentials (AUTH, WRONGPASS) or
// the command (NOPERM, an ACL) rather than being unreachable: a
// configuration to fix, not an outage to wait out.
func (e *StoreError) Denied() bool { return redisDenied(e.Err) }

func (e *StoreError) Unwrap() error { return e.Err }

// Is makes errors.Is(err, ErrStoreUnavailable) true.
func (e *StoreError) Is(target error) bool { return target == ErrStoreUnavailable }

// RefreshError reports a refresh that failed for a reason that may pass: the
// provider answered 5xx or 429, the network failed, or the fleet is backing
// off after such an answer. The grant is not dead. When the provider
// answered, its *oauth2.RetrieveError is reachable with errors.As.
type RefreshError struct {
	Grant string
	// RetryAfter is how long the provider asked us to wait (Retry-After), or
	// the backoff chosen when it did not say.
	RetryAfter time.Duration
	// Config is true when the provider rejected the client itself
	// (invalid_client, access_denied, unauthorized_client): a configuration
	// error such as a wrong client secret, not a dead grant.
	Config bool
	Err    error
}

func (e *RefreshError) Error() string {
	kind := "refresh failed"
	if e.Config {
		kind = "provider rejected the client configuration"
	}
	return fmt.Sprintf("tokenmgr: grant %q: %s (retry in %s): %s", e.Grant, kind, e.RetryAfter.Round(time.Millisecond), describe(e.Err))
}

func (e *RefreshError) Unwrap() error { return e.Err }

// DescribeProviderError summarises an error from a token endpoint (an
// *oauth2.RetrieveError or a transport error) without the response body,
// which an untrusted provider could fill with anything, a token included.
// Use it to log or show such errors.
func DescribeProviderError(err error) string { return describe(err) }

func describe(err error) string {
	var re *oauth2.RetrieveError
	if errors.As(err, &re) {
		s := "provider answered"
		if re.Response != nil {
			s += " " + printable(re.Response.Status, maxShownCode)
		}
		if re.ErrorCode != "" {
			s += " " + printable(re.ErrorCode, maxShownCode)
		}
		return s
	}
	if err == nil {
		return "unknown error"
	}
	return printable(err.Error(), maxStoredNote)
}
