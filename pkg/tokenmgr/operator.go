package tokenmgr

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
	"golang.org/x/oauth2"
)

// Admin reads and writes grant records for operators: seed, status and the
// refresher's schedule. It never calls the provider, so it needs no client
// registration. Every Manager has one (its methods are promoted).
type Admin struct {
	opts  Options
	log   *slog.Logger
	store *store
}

// NewAdmin builds an Admin. It uses Options.Redis (required), Provider (for
// the expiry countdowns written by Seed), KeyPrefix, Sealer, Holder, Now and
// Logger, and ignores the rest.
func NewAdmin(o Options) (*Admin, error) {
	if o.Redis == nil {
		return nil, errors.New("tokenmgr: invalid options: Options.Redis is required")
	}
	if o.KeyPrefix == "" {
		o.KeyPrefix = "tm"
	}
	if strings.ContainsAny(o.KeyPrefix, "{} \t\r\n") {
		return nil, fmt.Errorf("tokenmgr: invalid options: KeyPrefix %q must not contain braces or spaces", o.KeyPrefix)
	}
	if o.Holder == "" {
		o.Holder = defaultHolder()
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Sealer == nil {
		o.Sealer = plaintext{}
	}
	return newAdmin(o), nil
}

func newAdmin(o Options) *Admin {
	return &Admin{opts: o, log: o.Logger.With("component", "tokenmgr", "holder", o.Holder), store: newStore(o.Redis, o.KeyPrefix, o.Sealer)}
}

// SeedOptions qualify an imported pair.
type SeedOptions struct {
	// ConsentedAt is when the user consented; with Provider.AbsoluteExpiry
	// it sets the absolute expiry countdown. Default: now.
	ConsentedAt time.Time
}

// Seed imports a token pair for grant: it creates or replaces the record,
// bumps the version, clears a dead status and any refresh intent, and tells
// the fleet. It returns the new version. tok needs an access token, and a
// refresh token unless the provider does not rotate.
func (a *Admin) Seed(ctx context.Context, grant string, tok *oauth2.Token, so SeedOptions) (int64, error) {
	rec, err := a.seed(ctx, grant, tok, so)
	if err != nil {
		return 0, err
	}
	return rec.V, nil
}

// Seed is Admin.Seed; the Manager also starts serving the new pair at once.
func (m *Manager) Seed(ctx context.Context, grant string, tok *oauth2.Token, so SeedOptions) (int64, error) {
	rec, err := m.seed(ctx, grant, tok, so)
	if err != nil {
		return 0, err
	}
	if g := m.lookup(grant); g != nil {
		m.install(g, rec)
	}
	return rec.V, nil
}

func (a *Admin) seed(ctx context.Context, grant string, tok *oauth2.Token, so SeedOptions) (*record, error) {
	if err := ValidateGrantName(grant); err != nil {
		return nil, err
	}
	if tok == nil || tok.AccessToken == "" {
		return nil, errors.New("tokenmgr: seed: the token has no access_token")
	}
	if tok.RefreshToken == "" {
		return nil, errors.New("tokenmgr: seed: the token has no refresh_token; the grant could not be refreshed")
	}
	now := a.opts.Now()
	if so.ConsentedAt.IsZero() {
		so.ConsentedAt = now
	}
	rec := &record{
		Status:       StatusOK,
		AccessToken:  secret(tok.AccessToken),
		RefreshToken: secret(tok.RefreshToken),
		TokenType:    tok.TokenType,
		Expiry:       tok.Expiry,
		RotatedAt:    now,
		RotatedBy:    a.opts.Holder + " (seed)",
	}
	if rec.TokenType == "" {
		rec.TokenType = "Bearer"
	}
	if s, ok := tok.Extra("scope").(string); ok {
		rec.Scope = s
	}
	if a.opts.Provider.IdleExpiry > 0 {
		rec.IdleExpiry = now.Add(a.opts.Provider.IdleExpiry)
	}
	if a.opts.Provider.AbsoluteExpiry > 0 {
		rec.AbsoluteExpiry = so.ConsentedAt.Add(a.opts.Provider.AbsoluteExpiry)
	}
	k := grantKeys(a.opts.KeyPrefix, grant)
	v, err := a.store.seed(ctx, grant, k, rec)
	if err != nil {
		return nil, fmt.Errorf("tokenmgr: seed grant %q: %w", grant, err)
	}
	rec.V = v
	a.schedule(ctx, grant, rec)
	a.log.Info("grant seeded", "grant", grant, "version", v)
	return rec, nil
}

// GrantStatus is a grant's metadata as stored in Redis: never a token.
type GrantStatus struct {
	Grant           string    `json:"grant"`
	Version         int64     `json:"version"`
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
	// -1 when it could not be read (a Redis ACL without ZCOUNT). Far more
	// than the token lifetime explains means something forces refreshes
	// (401s, a misconfigured margin).
	RefreshesLastHour int64 `json:"refreshes_last_hour"`
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
	sts, errs := a.Statuses(ctx, []string{grant})
	return sts[0], errs[0]
}

// Statuses reads the metadata of each grant, like Status, in one pipelined
// round trip (one per node on Cluster): for views that list many grants.
// errs[i] is grants[i]'s error (a *NotFoundError, a *CorruptRecordError, a
// bad name or the Redis error); sts[i] is valid only when errs[i] is nil.
func (a *Admin) Statuses(ctx context.Context, grants []string) (sts []GrantStatus, errs []error) {
	sts, errs = make([]GrantStatus, len(grants)), make([]error, len(grants))
	type reads struct {
		record  *redis.MapStringStringCmd
		intent  *redis.SliceCmd
		rotated *redis.IntCmd
	}
	rs := make([]*reads, len(grants))
	since := "(" + strconv.FormatInt(a.opts.Now().Add(-rotationWindow).UnixMilli(), 10) // the last hour, exclusive
	_, _ = a.opts.Redis.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, g := range grants {
			if errs[i] = ValidateGrantName(g); errs[i] != nil {
				continue
			}
			k := grantKeys(a.opts.KeyPrefix, g)
			rs[i] = &reads{
				record:  p.HGetAll(ctx, k.record),
				intent:  p.HMGet(ctx, k.intent, "holder", "from_v", "started_at"),
				rotated: p.ZCount(ctx, k.rotations, since, "+inf"),
			}
		}
		return nil
	})
	for i, r := range rs {
		if r == nil {
			continue
		}
		if err := r.record.Err(); err != nil {
			errs[i] = err
			continue
		}
		if len(r.record.Val()) == 0 {
			errs[i] = &NotFoundError{Grant: grants[i]}
			continue
		}
		rec, err := decodeRecord(grants[i], r.record.Val(), nil)
		if err != nil {
			errs[i] = err
			continue
		}
		st := GrantStatus{
			Grant: grants[i], Version: rec.V, Status: rec.Status, Reason: rec.Reason, TokenType: rec.TokenType,
			Expiry: rec.Expiry, Scope: rec.Scope, RotatedAt: rec.RotatedAt, RotatedBy: rec.RotatedBy,
			RefreshCount: rec.RefreshCount, IdleExpiry: rec.IdleExpiry, AbsoluteExpiry: rec.AbsoluteExpiry,
			RetryAt: rec.RetryAt, Restored: rec.Restored, HasRefreshToken: rec.hasRefresh,
			RefreshesLastHour: r.rotated.Val(),
		}
		// The record is the status; the rest is detail that an ACL from
		// before it (no ZCOUNT) may refuse: unknown, not an error.
		if r.rotated.Err() != nil || r.record.Val()[fUncounted] == "1" {
			st.RefreshesLastHour = -1
		}
		// An intent for another version is left over; only the current
		// version's means a refresh is under way.
		if in := r.intent.Val(); r.intent.Err() == nil && len(in) == 3 && rec.Status == StatusOK && in[1] == strconv.FormatInt(rec.V, 10) {
			holder, _ := in[0].(string)
			st.Refreshing, st.RefreshHolder = true, holder
			started, _ := in[2].(string)
			st.RefreshStartedAt, _ = parseMS(started) // a bad value only loses the time
		}
		sts[i] = st
	}
	return sts, errs
}

// Rotate forces one fenced refresh of grant's current version now, as a
// 401 would, ignoring MinForcedRefreshAge. It returns the new version. If
// another process rotates first, that rotation counts.
func (m *Manager) Rotate(ctx context.Context, grant string) (int64, error) {
	st, err := m.Status(ctx, grant)
	if err != nil {
		return 0, err
	}
	if st.Status != StatusOK {
		return 0, &ReauthRequiredError{Grant: grant, Reason: st.Reason}
	}
	g := m.lookup(grant)
	if g == nil {
		if g, err = m.addGrant(grant); err != nil {
			return 0, err
		}
	}
	e, err := m.obtain(ctx, g, need{staleV: st.Version, force: true})
	if err != nil {
		return 0, err
	}
	return e.v, nil
}

// RefreshIfDue refreshes grant, fenced and under the lease like any
// refresh, if its token expires within RefreshBefore (capped at
// MaxRefreshFraction of its lifetime); otherwise it only reads it. This is
// what the refresher calls for each grant the schedule says is due; give
// its Manager a larger RefreshBefore than the workers', so that workers
// never wait on the provider.
func (m *Manager) RefreshIfDue(ctx context.Context, grant string) (GrantStatus, error) {
	g := m.lookup(grant)
	if g == nil {
		var err error
		if g, err = m.addGrant(grant); err != nil {
			return GrantStatus{}, err
		}
	}
	if _, err := m.obtain(ctx, g, need{refreshDue: true}); err != nil {
		return GrantStatus{}, err
	}
	return m.Status(ctx, grant)
}

// ScheduledGrant is a grant's place in the refresher's schedule.
type ScheduledGrant struct {
	Grant  string
	Expiry time.Time // of its access token, as last written
}

// DueGrants returns up to limit grants whose access token expires before
// t, soonest first, from the schedule (tm:due): no scan of the keyspace.
func (a *Admin) DueGrants(ctx context.Context, t time.Time, limit int64) ([]ScheduledGrant, error) {
	zs, err := a.opts.Redis.ZRangeArgsWithScores(ctx, redis.ZRangeArgs{
		Key: a.store.due, Start: "-inf", Stop: strconv.FormatInt(t.UnixMilli(), 10), ByScore: true, Count: limit,
	}).Result()
	if err != nil {
		return nil, err
	}
	out := make([]ScheduledGrant, 0, len(zs))
	for _, z := range zs {
		name, _ := z.Member.(string)
		out = append(out, ScheduledGrant{Grant: name, Expiry: time.UnixMilli(int64(z.Score))})
	}
	return out, nil
}

// DeadGrants counts the grants that need re-consent (parked at the end of
// the schedule), without reading their records.
func (a *Admin) DeadGrants(ctx context.Context) (int64, error) {
	return a.opts.Redis.ZCount(ctx, a.store.due, strconv.FormatInt(parked.UnixMilli(), 10), "+inf").Result()
}

// RefreshDueAt is when a Manager with these options considers st's token
// due: RefreshBefore before expiry, capped at MaxRefreshFraction of its
// lifetime.
func (m *Manager) RefreshDueAt(st GrantStatus) time.Time {
	if st.Expiry.IsZero() {
		return parked
	}
	return st.Expiry.Add(-m.margin(&record{Expiry: st.Expiry, RotatedAt: st.RotatedAt}))
}

// Grants lists every grant in the schedule (tm:due), soonest expiry first.
func (a *Admin) Grants(ctx context.Context) ([]string, error) {
	return a.opts.Redis.ZRange(ctx, a.store.due, 0, -1).Result()
}

// Postpone moves grant's place in the schedule to t, e.g. after a provider
// asked to retry later. The next rotation puts it back at its expiry.
func (a *Admin) Postpone(ctx context.Context, grant string, t time.Time) error {
	return a.store.schedule(ctx, grant, t)
}

// parked is the schedule score of grants with nothing to refresh.
var parked = time.Unix(1<<35, 0)

// schedule records when rec's token expires, for the refresher. A dead
// grant goes to the end: nothing to refresh until it is seeded again.
func (a *Admin) schedule(ctx context.Context, grant string, rec *record) {
	at := rec.Expiry
	if rec.Status != StatusOK || at.IsZero() {
		at = parked
	}
	if err := a.store.schedule(ctx, grant, at); err != nil {
		a.log.Warn("could not update the refresh schedule", "grant", grant, "err", err)
	}
}

// Rewrap re-encrypts grant's tokens under the Sealer's active key (after a
// key was added to a Keyring), fenced on the version like any write: if a
// rotation lands meanwhile, it has written fresh values already. It reports
// whether it wrote. The tokens themselves do not change, so workers are
// not told.
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
			return false, err
		}
		if rec.Status != StatusOK {
			return false, nil // a dead grant's tokens are not used again
		}
		raw, err := a.opts.Redis.HMGet(ctx, k.record, fAccess, fRefresh).Result()
		if err != nil {
			return false, err
		}
		current := encPrefix + kr.ActiveKeyID() + ":"
		if s0, _ := raw[0].(string); strings.HasPrefix(s0, current) {
			if s1, _ := raw[1].(string); strings.HasPrefix(s1, current) {
				return false, nil // already under the active key
			}
		}
		at, err := kr.Seal(grant, fAccess, []byte(rec.AccessToken))
		if err != nil {
			return false, err
		}
		rt, err := kr.Seal(grant, fRefresh, []byte(rec.RefreshToken))
		if err != nil {
			return false, err
		}
		written, err := a.store.rewrap(ctx, grant, k, rec.V, at, rt)
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
	return err
}
