package tokenmgr

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/oauth2"
)

// core is what Admin and Manager share: the defaulted options, the logger
// and the store, and the operator steps built on them.
type core struct {
	opts  Options
	log   *slog.Logger
	store *store
	// scheduleDenied: the schedule refused this user's write once; it is
	// logged once, not per rotation.
	scheduleDenied *atomic.Bool
	// plainRefused: there is no Sealer and AllowPlaintext is not set, so
	// nothing writes tokens (an Admin still reads metadata).
	plainRefused bool
}

func newCore(o Options) core {
	c := core{opts: o, log: o.Logger.With("component", "tokenmgr", "holder", o.Holder), store: newStore(o.Redis, o.KeyPrefix, o.Sealer), scheduleDenied: new(atomic.Bool)}
	c.store.layout = o.Layout
	if o.MinReplicas > 0 {
		timeout := o.ReplicaTimeout
		if timeout == 0 {
			timeout = time.Second
		}
		c.store.durable = &durability{replicas: o.MinReplicas, timeout: timeout, late: func(acked int64) {
			c.log.Warn("a write was acknowledged by fewer replicas than Options.MinReplicas in time; it stands, and a failover now could lose it",
				"acked", acked, "min_replicas", o.MinReplicas, "timeout", timeout)
		}}
	}
	return c
}

// Admin reads and writes grant records for operators: seed, status and the
// refresher's schedule. It never calls the provider, so it needs no client
// registration. A Manager has the same methods.
type Admin struct {
	core
}

// NewAdmin builds an Admin. It uses Options.Redis (required), Provider (for
// the expiry countdowns written by Seed), KeyPrefix, Sealer (needed to seed,
// check or rewrap tokens; not to read metadata), AllowPlaintext, Holder, Now,
// Messages, Layout, MinReplicas, ReplicaTimeout and Logger, and ignores the
// rest.
func NewAdmin(o Options) (*Admin, error) {
	o, errs := o.withStoreDefaults()
	if len(errs) > 0 {
		return nil, fmt.Errorf("tokenmgr: invalid options: %w", errors.Join(errs...))
	}
	a := &Admin{newCore(o)}
	a.chooseMessages(context.Background())
	if o.Sealer == nil {
		// Reads of metadata need no key; writing tokens in clear needs
		// AllowPlaintext.
		a.store.sealer = plaintext{}
		a.plainRefused = !o.AllowPlaintext
	}
	return a, nil
}

// maxSeedAhead bounds a seeded token's expiry.
const maxSeedAhead = 10 * 365 * 24 * time.Hour

// SeedOptions qualify an imported pair.
type SeedOptions struct {
	// ConsentedAt is when the user consented; with Provider.AbsoluteExpiry
	// it sets the absolute expiry countdown. Default: now.
	ConsentedAt time.Time
}

// Seed imports a token pair for grant: it creates or replaces the record,
// bumps the version, clears a dead status and any refresh intent, and tells
// the fleet. It returns the new version. tok needs an access token and a
// refresh token (a non-rotating provider's grant is refreshed with one too).
func (a *Admin) Seed(ctx context.Context, grant string, tok *oauth2.Token, so SeedOptions) (int64, error) {
	rec, err := a.seed(ctx, grant, tok, so)
	if err != nil {
		return 0, err
	}
	return rec.V, nil
}

func (c *core) seed(ctx context.Context, grant string, tok *oauth2.Token, so SeedOptions) (*record, error) {
	if err := ValidateGrantName(grant); err != nil {
		return nil, err
	}
	if tok == nil || tok.AccessToken == "" {
		return nil, errors.New("tokenmgr: seed: the token has no access_token")
	}
	if tok.RefreshToken == "" {
		return nil, errors.New("tokenmgr: seed: the token has no refresh_token; the grant could not be refreshed")
	}
	if c.plainRefused {
		return nil, errors.New("tokenmgr: seed: no Options.Sealer: set a *tokenmgr.Keyring, or AllowPlaintext to store the tokens in clear")
	}
	if err := checkAccessToken(tok.AccessToken); err != nil {
		return nil, fmt.Errorf("tokenmgr: seed: access_token: %w", err)
	}
	if tok.TokenType != "" {
		if err := checkTokenType(tok.TokenType); err != nil {
			return nil, fmt.Errorf("tokenmgr: seed: %w", err)
		}
	}
	now := c.opts.Now()
	if !tok.Expiry.IsZero() && (tok.Expiry.UnixMilli() <= 0 || tok.Expiry.After(now.Add(maxSeedAhead))) {
		return nil, fmt.Errorf("tokenmgr: seed: expiry %s is out of range (after 1970, at most %s ahead)", tok.Expiry.UTC().Format(time.RFC3339), maxSeedAhead)
	}
	if so.ConsentedAt.IsZero() {
		so.ConsentedAt = now
	}
	rec := recordFromToken(tok, now, c.opts.Holder+" (seed)", c.opts.Provider)
	if c.opts.Provider.AbsoluteExpiry > 0 {
		rec.AbsoluteExpiry = so.ConsentedAt.Add(c.opts.Provider.AbsoluteExpiry)
	}
	k := grantKeys(c.opts.KeyPrefix, grant)
	v, family, err := c.store.seed(ctx, grant, k, rec)
	if err != nil {
		return nil, fmt.Errorf("tokenmgr: seed grant %q: %w", grant, err)
	}
	rec.V, rec.Family = v, family
	c.schedule(ctx, grant, rec)
	c.log.InfoContext(ctx, "grant seeded", "grant", grant, "version", v)
	return rec, nil
}

// GrantStatus is a grant's metadata as stored in Redis: never a token.
type GrantStatus struct {
	Grant           string    `json:"grant"`
	Version         int64     `json:"version"`
	Family          string    `json:"family,omitempty"` // the token family: one per consent (seed)
	Status          string    `json:"status"`
	Reason          string    `json:"reason,omitempty"`
	TokenType       string    `json:"token_type"`
	Expiry          time.Time `json:"expiry"`
	Scope           string    `json:"scope,omitempty"`
	RotatedAt       time.Time `json:"rotated_at"`
	RotatedBy       string    `json:"rotated_by"`
	RefreshCount    int64     `json:"refresh_count"`
	IdleExpiry      time.Time `json:"idle_expiry,omitzero"`
	AbsoluteExpiry  time.Time `json:"absolute_expiry,omitzero"`
	RetryAt         time.Time `json:"retry_at,omitzero"`
	Restored        bool      `json:"restored,omitempty"`
	HasRefreshToken bool      `json:"has_refresh_token"`
	// RefreshesLastHour counts the rotations of the last hour, fleet-wide;
	// nil (JSON null) when unknown: it could not be read (a Redis ACL
	// without ZCOUNT) or a rotation was not counted. Far more than the
	// token lifetime explains means something forces refreshes (401s, a
	// misconfigured margin).
	RefreshesLastHour *int64 `json:"refreshes_last_hour"`
	// Refreshing: a holder recorded its intent to spend this version's
	// refresh token and has not written the result yet. An intent much older
	// than the provider's timeout is a holder that died mid-call; the next
	// refresh replays it.
	Refreshing       bool      `json:"refreshing,omitempty"`
	RefreshHolder    string    `json:"refresh_holder,omitempty"`
	RefreshStartedAt time.Time `json:"refresh_started_at,omitzero"`
}

// LogValue lets a GrantStatus be logged as a group.
func (s GrantStatus) LogValue() slog.Value {
	return slog.GroupValue(slog.String("grant", s.Grant), slog.Int64("version", s.Version),
		slog.String("status", s.Status), slog.String("reason", s.Reason), slog.Time("expiry", s.Expiry))
}

// Status reads grant's metadata from Redis. It decrypts nothing, so it
// works without the encryption key.
func (a *Admin) Status(ctx context.Context, grant string) (GrantStatus, error) {
	return a.status(ctx, grant)
}

func (c *core) status(ctx context.Context, grant string) (GrantStatus, error) {
	sts, errs := c.statuses(ctx, []string{grant})
	return sts[0], errs[0]
}

// Statuses reads the metadata of each grant, like Status, in one pipelined
// round trip (one per node on Cluster): for views that list many grants.
// errs[i] is grants[i]'s error (a *NotFoundError, a *CorruptRecordError, a
// bad name or the Redis error); sts[i] is valid only when errs[i] is nil.
func (a *Admin) Statuses(ctx context.Context, grants []string) (sts []GrantStatus, errs []error) {
	return a.statuses(ctx, grants)
}

func (c *core) statuses(ctx context.Context, grants []string) ([]GrantStatus, []error) {
	sts, errs := make([]GrantStatus, len(grants)), make([]error, len(grants))
	var valid []string
	var at []int
	for i, g := range grants {
		if errs[i] = ValidateGrantName(g); errs[i] == nil {
			valid = append(valid, g)
			at = append(at, i)
		}
	}
	metas, merrs := c.store.readMeta(ctx, valid, c.opts.Now())
	for j, i := range at {
		if errs[i] = storeErr(grants[i], "read status", merrs[j]); errs[i] != nil {
			continue
		}
		rec, meta := metas[j].rec, metas[j]
		sts[i] = GrantStatus{
			Grant: grants[i], Version: rec.V, Family: rec.Family, Status: rec.Status, Reason: rec.Reason, TokenType: rec.TokenType,
			Expiry: rec.Expiry, Scope: rec.Scope, RotatedAt: rec.RotatedAt, RotatedBy: rec.RotatedBy,
			RefreshCount: rec.RefreshCount, IdleExpiry: rec.IdleExpiry, AbsoluteExpiry: rec.AbsoluteExpiry,
			RetryAt: rec.RetryAt, Restored: rec.Restored, HasRefreshToken: rec.hasRefresh,
			RefreshesLastHour: lastHour(meta.rotationsLastHour),
			Refreshing:        meta.refreshing, RefreshHolder: meta.refreshHolder, RefreshStartedAt: meta.refreshStarted,
		}
	}
	return sts, errs
}

// lastHour is the count of the last hour's rotations, nil when unknown.
func lastHour(n int64) *int64 {
	if n < 0 {
		return nil
	}
	return &n
}

// ScheduledGrant is a grant's place in the refresher's schedule.
type ScheduledGrant struct {
	Grant  string
	Expiry time.Time // of its access token, as last written
}

// DueGrants returns up to limit grants whose access token expires before
// t, soonest first, from the schedule (tm:due): no scan of the keyspace.
func (a *Admin) DueGrants(ctx context.Context, t time.Time, limit int64) ([]ScheduledGrant, error) {
	return a.dueGrants(ctx, t, limit)
}

func (c *core) dueGrants(ctx context.Context, t time.Time, limit int64) ([]ScheduledGrant, error) {
	due, err := c.store.dueGrants(ctx, t, limit)
	return due, storeErr("", "read the schedule", err)
}

// DeadGrants counts the grants that need re-consent (parked at the end of
// the schedule), without reading their records.
func (a *Admin) DeadGrants(ctx context.Context) (int64, error) {
	return a.deadGrants(ctx)
}

func (c *core) deadGrants(ctx context.Context) (int64, error) {
	n, err := c.store.countParked(ctx)
	return n, storeErr("", "count dead grants", err)
}

// Grants lists every grant in the schedule (tm:due), soonest expiry first.
func (a *Admin) Grants(ctx context.Context) ([]string, error) {
	return a.scheduled(ctx)
}

func (c *core) scheduled(ctx context.Context) ([]string, error) {
	gs, err := c.store.scheduledGrants(ctx)
	return gs, storeErr("", "read the schedule", err)
}

// Postpone moves grant's place in the schedule to t, e.g. after a provider
// asked to retry later. The next rotation puts it back at its expiry.
func (a *Admin) Postpone(ctx context.Context, grant string, t time.Time) error {
	return a.postpone(ctx, grant, t)
}

func (c *core) postpone(ctx context.Context, grant string, t time.Time) error {
	return storeErr(grant, "write the schedule", c.store.schedule(ctx, grant, t))
}

// storeErr wraps a Redis error in a *StoreError; the package's own errors
// (not found, corrupt) and nil pass through.
func storeErr(grant, op string, err error) error {
	var nf *NotFoundError
	var corrupt *CorruptRecordError
	var se *StoreError
	if err == nil || errors.As(err, &nf) || errors.As(err, &corrupt) || errors.As(err, &se) || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	return &StoreError{Grant: grant, Op: op, Err: err}
}

// schedule records when rec's token expires, for the refresher. A dead
// grant goes to the end: nothing to refresh until it is seeded again.
func (c *core) schedule(ctx context.Context, grant string, rec *record) {
	at := rec.Expiry
	if rec.Status != StatusOK || at.IsZero() {
		at = parked
	}
	if err := c.store.schedule(ctx, grant, at); err != nil {
		if redisDenied(err) {
			// The README's worker ACL keeps workers out of the schedule;
			// the refresher moves the grant when it next reads it.
			if !c.scheduleDenied.Swap(true) {
				c.log.InfoContext(ctx, "this Redis user may not write the refresh schedule (tm:due); the refresher keeps it", "grant", grant)
			}
			return
		}
		c.log.WarnContext(ctx, "could not update the refresh schedule", "grant", grant, "err", err)
	}
}

// Rewrap re-encrypts grant's tokens under the Sealer's active key (after a
// key was added to a Keyring), and moves them into the Admin's
// Options.Layout, fenced on the version like any write: if a rotation lands
// meanwhile, it has written fresh values already. It reports whether it
// wrote. The tokens themselves do not change, so workers are not told.
func (a *Admin) Rewrap(ctx context.Context, grant string) (bool, error) {
	kr, ok := a.opts.Sealer.(*Keyring)
	if !ok {
		return false, errors.New("tokenmgr: rewrap needs a Keyring as the Sealer")
	}
	// Values are written under the active key only: make sure every process
	// holds it before rewrapping (see the README on key rotation).
	k := grantKeys(a.opts.KeyPrefix, grant)
	for range 3 {
		rec, err := a.store.read(ctx, grant, k)
		if errors.Is(err, errMissing) {
			return false, &NotFoundError{Grant: grant}
		}
		if err != nil {
			return false, storeErr(grant, "read", err)
		}
		if rec.Status != StatusOK {
			return false, nil // a dead grant's tokens are not used again
		}
		sealedAccess, sealedRefresh, layout, err := a.store.sealedTokenFields(ctx, grant, k)
		if err != nil {
			return false, err
		}
		current := encPrefix + kr.ActiveKeyID() + ":"
		if strings.HasPrefix(sealedAccess, current) && strings.HasPrefix(sealedRefresh, current) && layout == a.store.layout {
			return false, nil // already under the active key, where this layout keeps it
		}
		at, err := kr.Seal(grant, boundField(fAccess, rec.Family, rec.V), []byte(rec.AccessToken))
		if err != nil {
			return false, err
		}
		rt, err := kr.Seal(grant, boundField(fRefresh, rec.Family, rec.V), []byte(rec.RefreshToken))
		if err != nil {
			return false, err
		}
		written, err := a.store.rewrap(ctx, grant, k, rec.V, rec.Family, at, rt)
		if err != nil || written {
			return written, err
		}
	}
	return false, fmt.Errorf("tokenmgr: rewrap %q: the grant kept rotating; try again", grant)
}

// Check decodes grant's whole record, tokens included, and returns what is
// wrong with it (a *CorruptRecordError naming the field), or nil.
func (a *Admin) Check(ctx context.Context, grant string) error {
	_, err := a.store.read(ctx, grant, grantKeys(a.opts.KeyPrefix, grant))
	if errors.Is(err, errMissing) {
		return &NotFoundError{Grant: grant}
	}
	return storeErr(grant, "read", err)
}
