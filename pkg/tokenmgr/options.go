package tokenmgr

import (
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/redis/go-redis/v9"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/oauth2"
)

// Options configure a Manager. Zero values take the documented defaults.
type Options struct {
	// Redis holds the token records. Required. Single, Sentinel (failover)
	// and Cluster clients all work: every key of a grant shares a hash tag.
	// A *redis.ClusterClient gets one hook (once, however many Managers
	// share it): a command that fails on a dead or demoted node makes the
	// client reload its slot map at once, instead of after go-redis's
	// periodic reload, so a failover is followed within seconds.
	Redis redis.UniversalClient
	// LockRedis are independent Redis masters for Redlock. Default: Redis
	// alone. With several, a lease needs a majority of them.
	LockRedis []redis.UniversalClient

	// OAuth2 is the client registration. ClientID and Endpoint.TokenURL are
	// required, and Endpoint.AuthStyle must be explicit (InHeader or
	// InParams): auto-detection retries a failed refresh with the other
	// style, which presents the same refresh token twice.
	OAuth2 *oauth2.Config
	// Provider is the provider profile. Required (see Atlassian, Strict...).
	Provider Provider
	// PreviousClientSecret, while a client secret is being rotated, is the
	// secret before OAuth2.ClientSecret: a refresh the provider refuses as
	// invalid_client (or Atlassian's access_denied) is tried once more with
	// it, counted in Stats.SecretFallbacks and logged. Safe: a rejected
	// client is refused before the refresh token is looked at.
	PreviousClientSecret string
	// IdPTransport carries calls to the token endpoint. Default
	// http.DefaultTransport.
	IdPTransport http.RoundTripper

	// LeaseTTL is the Redlock lease for one refresh. It is short and kept
	// alive (extended every third of it) while its holder lives: during
	// the provider call, while the answer is being written, and while
	// Redis refuses the answer and the holder keeps it. A holder that dies
	// is replaced within one LeaseTTL. Default 3s, at least 1s. With a
	// provider reuse leeway, LeaseTTL + 3 x Provider.HTTPTimeout (the
	// worst case from a first call to its successor's) must fit in it.
	LeaseTTL time.Duration
	// RefreshBefore is how long before expiry a refresh starts. Default 5m.
	// It is capped at MaxRefreshFraction of the token's lifetime, so short
	// tokens are not refreshed the moment they are issued.
	RefreshBefore time.Duration
	// MaxRefreshFraction caps RefreshBefore as a fraction of the token's
	// lifetime. Default 0.2; at most 0.5.
	MaxRefreshFraction float64
	// MinForcedRefreshAge stops a stream of 401s from refreshing again and
	// again: a 401 forces a refresh of version v only if v was written at
	// least this long ago. Default 5s.
	MinForcedRefreshAge time.Duration
	// WaitTimeout bounds how long one Token call waits for a token while
	// another process holds the lease, and how long one load or refresh
	// runs. Default Provider.HTTPTimeout + 2 x LeaseTTL.
	WaitTimeout time.Duration
	// LockRetry is the pause between attempts to take a lease held by
	// another process (jittered); rotation messages cut it short. Default 100ms.
	LockRetry time.Duration
	// PollInterval is how often versions are polled while the rotation
	// subscription is down. Default 1s.
	PollInterval time.Duration
	// MaxBackoff caps the backoff after transient provider errors when the
	// provider gave no Retry-After. Default 1m.
	MaxBackoff time.Duration

	// MinReplicas, when above 0, makes every write that creates a version
	// (a rotation, a restore, a seed), and the intent written before a
	// provider call, wait until that many replicas have it (Redis WAIT), at
	// most ReplicaTimeout: after a failover the successor then finds the
	// intent and does not spend the same refresh token again. A write that times out
	// stands and is counted (Stats.ReplicaAckTimeouts). It makes a
	// failover that loses a rotation rarer; it does not make Redis
	// consistent: Sentinel or Cluster may still promote a replica that did
	// not acknowledge, and then the newest pair a process holds repairs
	// the record. Needs a *redis.Client (single or Sentinel) or a
	// *redis.ClusterClient.
	MinReplicas int
	// ReplicaTimeout bounds the wait for MinReplicas. Default 1s.
	ReplicaTimeout time.Duration

	// Messages says where rotation messages go: MessagesAuto (default:
	// each grant's own sharded channel on a Redis 7 Cluster, the global
	// channel elsewhere), MessagesGlobal, or MessagesSharded. While a Cluster
	// fleet is being upgraded from a release without sharded messages, set
	// MessagesGlobal until every process runs this one.
	Messages Messages

	// Layout says where the sealed tokens are stored: LayoutHash (default,
	// fields of the record hash, as in every earlier release) or LayoutPair
	// (a string of their own, so the record hash stays compact: about half
	// the memory per grant). Every process reads both; set LayoutPair once
	// no process of a release before it is left.
	Layout Layout

	// KeyPrefix starts every key and channel name. Default "tm".
	KeyPrefix string
	// Holder names this process in intents and rotated_by. Default
	// hostname-pid.
	Holder string
	// Sealer encrypts token values at rest: a *Keyring (NewKeyring,
	// ParseKeyring). Required by New unless AllowPlaintext is set.
	Sealer Sealer
	// AllowPlaintext lets New run without a Sealer: tokens are stored as
	// "plain:..." (readable by anyone who can read Redis) and an error is
	// logged at start. For tests and demos only.
	AllowPlaintext bool
	// Now is the clock of token time: expiries and the refresh deadlines
	// derived from them, the times written to Redis (rotated_at, retry_at,
	// an intent's started_at) and the backoffs counted from them. Lease
	// TTLs, HTTP timeouts, waits and poll intervals run on real time.
	// Default time.Now. A Now without Clock is read on every Token call;
	// prefer Clock, whose timers let Token read no clock at all.
	Now func() time.Time
	// Clock is Now with timers on it: each cached token turns due and then
	// expired by a timer at its deadlines, so a fresh Token() is two atomic
	// loads and no clock read. Default: the real clock (time.Now and
	// time.AfterFunc). tokenmgrtest.Clock is one for tests. When set, it
	// replaces Now.
	Clock Clock
	// Logger receives the Manager's logs; never a token. Default slog.Default().
	Logger *slog.Logger

	// Observer, if set, receives the timings of provider calls and lease
	// waits, for metrics (tokenmgrprom.NewObserver).
	Observer Observer
	// TracerProvider makes the Manager's OpenTelemetry spans: a refresh
	// (tokenmgr.refresh) with its lease wait, provider call, fenced write
	// and restore, and the 401 rule (tokenmgr.unauthorized). Default: the
	// global provider, otel.GetTracerProvider().
	TracerProvider trace.TracerProvider

	// OnVersion, if set, is called each time the Manager starts serving a
	// new version of a grant (after a rotation here or elsewhere, a seed or
	// a restore): for metrics such as rotation-to-adoption latency. It
	// must not block.
	OnVersion func(grant string, version int64)
}

const (
	defaultHTTPTimeout   = 10 * time.Second
	defaultRefreshBefore = 5 * time.Minute
	defaultFraction      = 0.2
	defaultAccessTTL     = 5 * time.Minute
	defaultKeyPrefix     = "tm"
	defaultLeaseTTL      = 3 * time.Second
	minLeaseTTL          = time.Second
)

// recoveryWindow is the longest a refresh token may wait between its first
// presentation and a successor's replay after the holder died: the call,
// the write of its answer with the lease kept alive, the lease running
// out, and the successor's own call.
func recoveryWindow(o Options) time.Duration {
	return o.LeaseTTL + 3*o.Provider.HTTPTimeout
}

// withStoreDefaults fills and checks what every user of the store needs,
// Manager and Admin alike: Redis, KeyPrefix, Holder, Layout, Now and Logger.
func (o Options) withStoreDefaults() (Options, []error) {
	var errs []error
	if o.Redis == nil {
		errs = append(errs, errors.New("Options.Redis is required"))
	}
	if o.KeyPrefix == "" {
		o.KeyPrefix = defaultKeyPrefix
	}
	if strings.ContainsAny(o.KeyPrefix, "{} \t\r\n") {
		errs = append(errs, fmt.Errorf("KeyPrefix %q must not contain braces or spaces", o.KeyPrefix))
	}
	if o.Holder == "" {
		o.Holder = defaultHolder()
	}
	if o.Layout != LayoutHash && o.Layout != LayoutPair {
		errs = append(errs, fmt.Errorf("Options.Layout %d is neither LayoutHash nor LayoutPair", o.Layout))
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return o, errs
}

// Clock is a clock with timers (see Options.Clock). AfterFunc calls f
// once, in its own goroutine or in the one that moves the clock, when d has
// passed; stop cancels it and reports whether it did.
type Clock interface {
	Now() time.Time
	AfterFunc(d time.Duration, f func()) (stop func() bool)
}

// realClock is time.Now with the runtime's timers.
type realClock struct{}

func (realClock) Now() time.Time { return time.Now() }
func (realClock) AfterFunc(d time.Duration, f func()) func() bool {
	return time.AfterFunc(d, f).Stop
}

// withDefaults fills zero values and rejects combinations that cannot work.
func (o Options) withDefaults() (Options, error) {
	switch {
	case o.Clock != nil:
		o.Now = o.Clock.Now
	case o.Now == nil:
		o.Clock = realClock{}
		o.Now = time.Now
	}
	o, errs := o.withStoreDefaults()
	if o.OAuth2 == nil {
		errs = append(errs, errors.New("Options.OAuth2 is required"))
	} else {
		if o.OAuth2.ClientID == "" {
			errs = append(errs, errors.New("OAuth2.ClientID is required"))
		}
		if o.OAuth2.Endpoint.TokenURL == "" {
			errs = append(errs, errors.New("OAuth2.Endpoint.TokenURL is required"))
		}
		switch o.OAuth2.Endpoint.AuthStyle {
		case oauth2.AuthStyleInHeader, oauth2.AuthStyleInParams:
		default:
			errs = append(errs, errors.New("OAuth2.Endpoint.AuthStyle must be oauth2.AuthStyleInHeader or oauth2.AuthStyleInParams: "+
				"auto-detection retries a failed refresh with the other style and so presents the same refresh token twice"))
		}
	}
	if o.Sealer == nil && !o.AllowPlaintext {
		errs = append(errs, errors.New("Options.Sealer is required: a *tokenmgr.Keyring (tokenmgr.ParseKeyring), so tokens are encrypted in Redis; set AllowPlaintext to store them in clear (tests and demos only)"))
	}
	if o.Provider.Name == "" {
		errs = append(errs, errors.New("Options.Provider is required (tokenmgr.Atlassian, Strict, Okta, Xero, NonRotating or your own)"))
	}
	if o.Provider.HTTPTimeout == 0 {
		o.Provider.HTTPTimeout = defaultHTTPTimeout
	}
	if o.Provider.DefaultAccessTTL == 0 {
		o.Provider.DefaultAccessTTL = defaultAccessTTL
	}
	if o.LeaseTTL == 0 {
		o.LeaseTTL = defaultLeaseTTL
	}
	if o.Provider.HTTPTimeout < 0 || o.LeaseTTL < 0 || o.RefreshBefore < 0 || o.MinForcedRefreshAge < 0 ||
		o.WaitTimeout < 0 || o.LockRetry < 0 || o.PollInterval < 0 || o.MaxBackoff < 0 || o.Provider.ReuseLeeway < 0 ||
		o.ReplicaTimeout < 0 || o.MinReplicas < 0 {
		errs = append(errs, errors.New("durations and MinReplicas must not be negative"))
	}
	if o.LeaseTTL < minLeaseTTL {
		errs = append(errs, fmt.Errorf("lease TTL %s must be at least %s: it is extended every third of it, and each extension is a Redis round trip", o.LeaseTTL, minLeaseTTL))
	}
	if lw := o.Provider.ReuseLeeway; lw > 0 {
		if window := recoveryWindow(o); window > lw {
			errs = append(errs, fmt.Errorf("crash-recovery window %s (lease TTL %s + 3 x HTTP timeout %s: the call, the write with the lease kept alive, the successor's own call) does not fit in the %s reuse leeway of provider %q: "+
				"if a holder dies mid-refresh, its successor may replay the refresh token only while the provider still accepts it; shorten the lease or the timeout",
				window, o.LeaseTTL, o.Provider.HTTPTimeout, lw, o.Provider.Name))
		}
	}
	if o.MinReplicas > 0 {
		switch o.Redis.(type) {
		case *redis.Client, *redis.ClusterClient:
		default:
			errs = append(errs, fmt.Errorf("MinReplicas needs Options.Redis to be a *redis.Client or *redis.ClusterClient (WAIT must run on the writing connection), not %T", o.Redis))
		}
		if o.ReplicaTimeout == 0 {
			o.ReplicaTimeout = time.Second
		}
	}
	if o.RefreshBefore == 0 {
		o.RefreshBefore = defaultRefreshBefore
	}
	if o.MaxRefreshFraction == 0 {
		o.MaxRefreshFraction = defaultFraction
	}
	if o.MaxRefreshFraction <= 0 || o.MaxRefreshFraction > 0.5 {
		errs = append(errs, fmt.Errorf("MaxRefreshFraction %v must be in (0, 0.5]", o.MaxRefreshFraction))
	}
	if o.MinForcedRefreshAge == 0 {
		o.MinForcedRefreshAge = 5 * time.Second
	}
	if o.WaitTimeout == 0 {
		o.WaitTimeout = o.Provider.HTTPTimeout + 2*o.LeaseTTL
	}
	if o.LockRetry == 0 {
		o.LockRetry = 100 * time.Millisecond
	}
	if o.PollInterval == 0 {
		o.PollInterval = time.Second
	}
	if o.MaxBackoff == 0 {
		o.MaxBackoff = time.Minute
	}
	if o.IdPTransport == nil {
		o.IdPTransport = http.DefaultTransport
	}
	if o.Observer == nil {
		o.Observer = noObserver{}
	}
	if len(errs) > 0 {
		return o, fmt.Errorf("tokenmgr: invalid options: %w", errors.Join(errs...))
	}
	return o, nil
}

// ValidateGrantName reports whether name can name a grant: 1-200 bytes of
// UTF-8, free of braces (they would break the Redis Cluster hash tag), of
// whitespace of any kind (rotation messages are "GRANT VERSION") and of
// control or format characters (a name is shown to operators), and not
// "." or ".." (URL path segments that browsers resolve away).
func ValidateGrantName(name string) error {
	ok := name != "" && len(name) <= 200 && utf8.ValidString(name) && name != "." && name != ".." &&
		strings.IndexFunc(name, func(r rune) bool {
			return r == '{' || r == '}' || unicode.IsSpace(r) || !unicode.IsPrint(r)
		}) < 0
	if !ok {
		return fmt.Errorf("tokenmgr: invalid grant name %s: 1-200 bytes, printable, no braces or whitespace, not . or ..", quoted(name))
	}
	return nil
}

// defaultHolder names this process: hostname-pid.
func defaultHolder() string {
	host, _ := os.Hostname()
	return fmt.Sprintf("%s-%d", host, os.Getpid())
}
