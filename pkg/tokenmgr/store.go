package tokenmgr

import (
	"context"
	_ "embed"
	"errors"
	"fmt"
	"net"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"
)

// store is the one door to Redis: every command and script the package
// sends to the token store goes through it (the lease's commands go
// through redsync, in lease.go). Each script is a small compare-then-act
// step in its own file with a contract header; go-redis sends EVALSHA and
// falls back to EVAL when the script is not cached.
type store struct {
	rdb     redis.UniversalClient
	sealer  Sealer
	channel string // rotation messages, "GRANT VERSION"
	due     string // sorted set GRANT -> unix ms expiry of its access token (the refresher's schedule)
	prefix  string
}

var (
	//go:embed scripts/rotate.lua
	rotateSrc    string
	rotateScript = redis.NewScript(rotateSrc)
	//go:embed scripts/seed.lua
	seedSrc    string
	seedScript = redis.NewScript(seedSrc)
	//go:embed scripts/restore.lua
	restoreSrc    string
	restoreScript = redis.NewScript(restoreSrc)
	//go:embed scripts/intent.lua
	intentSrc    string
	intentScript = redis.NewScript(intentSrc)
	//go:embed scripts/mark.lua
	markSrc    string
	markScript = redis.NewScript(markSrc)
)

// keys are the Redis names of one grant. The grant sits in a hash tag, so
// all of them live in one Cluster slot and a script may touch them together.
type keys struct {
	record, lock, intent string
	rotations            string // sorted set of the last hour's rotations, for operators
}

func grantKeys(prefix, grant string) keys {
	tag := prefix + ":{" + grant + "}:"
	return keys{record: tag + "tok", lock: tag + "lock", intent: tag + "intent", rotations: tag + "rotations"}
}

// rotationWindow is how far back the rotations set reaches: operators see
// "refreshes in the last hour", and a grant rotating far more often than its
// token lifetime says something is forcing refreshes.
const rotationWindow = time.Hour

// parked is the schedule score of grants with nothing to refresh (dead,
// not found, no expiry): far in the future, so they never crowd the head
// of the schedule.
var parked = time.Unix(1<<35, 0)

func newStore(rdb redis.UniversalClient, prefix string, s Sealer) *store {
	return &store{rdb: rdb, sealer: s, channel: prefix + ":rotated", due: prefix + ":due", prefix: prefix}
}

var errMissing = errors.New("record missing")

// read returns the grant's record; errMissing when there is none, a
// *CorruptRecordError when it cannot be decoded, or the Redis error.
func (s *store) read(ctx context.Context, grant string, k keys) (*record, error) {
	h, err := s.rdb.HGetAll(ctx, k.record).Result()
	if err != nil {
		return nil, err
	}
	if len(h) == 0 {
		return nil, errMissing
	}
	return decodeRecord(grant, h, s.sealer)
}

// readVersions returns the stored version of each grant in one pipelined
// round trip: 0 when the record is missing, -1 when its read failed (on
// Cluster, one shard can fail while the others answer). Used by the poll.
func (s *store) readVersions(ctx context.Context, grants []string) []int64 {
	cmds := make([]*redis.StringCmd, len(grants))
	_, _ = s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, g := range grants {
			cmds[i] = p.HGet(ctx, grantKeys(s.prefix, g).record, fV)
		}
		return nil
	})
	out := make([]int64, len(grants))
	for i, c := range cmds {
		switch err := c.Err(); {
		case errors.Is(err, redis.Nil):
			out[i] = 0
		case err != nil:
			out[i] = -1
		default:
			v, err := strconv.ParseInt(c.Val(), 10, 64)
			if err != nil {
				v = -1
			}
			out[i] = v
		}
	}
	return out
}

// grantMeta is what operators' views read of one grant: the record's
// metadata (no token decrypted), the current refresh intent and the last
// hour's rotations.
type grantMeta struct {
	rec *record
	// refreshing is set when an intent for the record's current version
	// is stored: a holder is (or was, if it died) spending its token.
	refreshing     bool
	refreshHolder  string
	refreshStarted time.Time
	// rotationsLastHour is -1 when it could not be read (a Redis ACL
	// without ZCOUNT) or was not tracked (one without ZREMRANGEBYSCORE).
	rotationsLastHour int64
}

// readMeta reads the metadata of each grant in one pipelined round trip
// (one per node on Cluster). errs[i] is grants[i]'s error: a
// *NotFoundError, a *CorruptRecordError, or the Redis error.
func (s *store) readMeta(ctx context.Context, grants []string, now time.Time) ([]grantMeta, []error) {
	metas, errs := make([]grantMeta, len(grants)), make([]error, len(grants))
	type reads struct {
		record  *redis.MapStringStringCmd
		intent  *redis.SliceCmd
		rotated *redis.IntCmd
	}
	rs := make([]reads, len(grants))
	since := "(" + strconv.FormatInt(now.Add(-rotationWindow).UnixMilli(), 10) // the last hour, exclusive
	_, _ = s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, g := range grants {
			k := grantKeys(s.prefix, g)
			rs[i] = reads{
				record:  p.HGetAll(ctx, k.record),
				intent:  p.HMGet(ctx, k.intent, "holder", "from_v", "started_at"),
				rotated: p.ZCount(ctx, k.rotations, since, "+inf"),
			}
		}
		return nil
	})
	for i, r := range rs {
		if err := r.record.Err(); err != nil {
			errs[i] = err
			continue
		}
		h := r.record.Val()
		if len(h) == 0 {
			errs[i] = &NotFoundError{Grant: grants[i]}
			continue
		}
		rec, err := decodeRecord(grants[i], h, nil)
		if err != nil {
			errs[i] = err
			continue
		}
		meta := grantMeta{rec: rec, rotationsLastHour: r.rotated.Val()}
		// The record is the status; the rest is detail that an ACL from
		// before it (no ZCOUNT) may refuse: unknown, not an error.
		if r.rotated.Err() != nil || h[fUncounted] == "1" {
			meta.rotationsLastHour = -1
		}
		// An intent for another version is left over; only the current
		// version's means a refresh is under way.
		if in := r.intent.Val(); r.intent.Err() == nil && len(in) == 3 && rec.Status == StatusOK && in[1] == strconv.FormatInt(rec.V, 10) {
			holder, _ := in[0].(string)
			meta.refreshing, meta.refreshHolder = true, holder
			started, _ := in[2].(string)
			meta.refreshStarted, _ = parseMS(started) // a bad value only loses the time
		}
		metas[i] = meta
	}
	return metas, errs
}

// sealedTokenFields returns the stored (sealed) access and refresh token
// values as they are, for rewrap to see which key sealed them.
func (s *store) sealedTokenFields(ctx context.Context, k keys) (access, refresh string, err error) {
	raw, err := s.rdb.HMGet(ctx, k.record, fAccess, fRefresh).Result()
	if err != nil {
		return "", "", err
	}
	access, _ = raw[0].(string)
	refresh, _ = raw[1].(string)
	return access, refresh, nil
}

type casResult int

const (
	casWritten  casResult = iota
	casConflict           // another writer moved the version on
	casMissing            // the record is gone
)

// rotate writes rec as the successor of version fromV (invariant 1).
// counted is false when the rotations set refused the rotation (a Redis
// user without ZREMRANGEBYSCORE): the write itself stands.
func (s *store) rotate(ctx context.Context, grant string, k keys, fromV int64, rec *record) (res casResult, v int64, counted bool, err error) {
	f, err := rec.fields(grant, s.sealer)
	if err != nil {
		return 0, 0, false, err
	}
	args := append([]any{strconv.FormatInt(fromV, 10), s.channel, grant, rec.RotatedAt.UnixMilli(), rotationWindow.Milliseconds()}, f...)
	reply, err := rotateScript.Run(ctx, s.rdb, []string{k.record, k.intent, k.rotations}, args...).Int64Slice()
	if err != nil {
		return 0, 0, false, err
	}
	if len(reply) < 2 {
		return 0, 0, false, fmt.Errorf("rotate script: unexpected reply of %d elements", len(reply))
	}
	switch reply[0] {
	case 1:
		return casWritten, reply[1], len(reply) > 2 && reply[2] == 1, nil
	case 0:
		return casConflict, reply[1], false, nil
	default:
		return casMissing, 0, false, nil
	}
}

// seed creates or replaces the record and returns its new version.
func (s *store) seed(ctx context.Context, grant string, k keys, rec *record) (int64, error) {
	f, err := rec.fields(grant, s.sealer)
	if err != nil {
		return 0, err
	}
	args := append([]any{s.channel, grant}, f...)
	return seedScript.Run(ctx, s.rdb, []string{k.record, k.intent}, args...).Int64()
}

// restore puts rec back at its version if Redis lost the record.
func (s *store) restore(ctx context.Context, grant string, k keys, rec *record) (bool, error) {
	f, err := rec.fields(grant, s.sealer)
	if err != nil {
		return false, err
	}
	args := append([]any{strconv.FormatInt(rec.V, 10), s.channel, grant}, f...)
	res, err := restoreScript.Run(ctx, s.rdb, []string{k.record}, args...).Int64Slice()
	if err != nil {
		return false, err
	}
	return len(res) > 0 && res[0] == 1, nil
}

// intent describes a refresh that was started and may have spent the
// refresh token.
type intent struct {
	PreviousHolder string    // non-empty: someone else started a refresh of this version before us
	StartedAt      time.Time // when the first attempt at this version started
	Attempts       int64
}

// beginRefresh records the intent to spend the refresh token of version v.
// errMissing or a conflict (ok false) means the record changed underneath.
func (s *store) beginRefresh(ctx context.Context, k keys, v int64, holder string, now time.Time, ttl time.Duration) (intent, bool, error) {
	res, err := intentScript.Run(ctx, s.rdb, []string{k.record, k.intent},
		strconv.FormatInt(v, 10), holder, now.UnixMilli(), ttl.Milliseconds()).Slice()
	if err != nil {
		return intent{}, false, err
	}
	switch code, _ := res[0].(int64); code {
	case -1:
		return intent{}, false, errMissing
	case 0:
		return intent{}, false, nil
	}
	if len(res) != 4 {
		return intent{}, false, fmt.Errorf("intent script: unexpected reply of %d elements", len(res))
	}
	in := intent{}
	in.PreviousHolder, _ = res[1].(string)
	started, _ := res[2].(string)
	t, err := parseMS(started)
	if err != nil {
		return intent{}, false, fmt.Errorf("intent started_at: %w", err)
	}
	in.StartedAt = t
	in.Attempts, _ = res[3].(int64)
	return in, true, nil
}

// markDead records that version v's grant needs re-consent, and why.
func (s *store) markDead(ctx context.Context, grant string, k keys, v int64, reason string) (bool, error) {
	n, err := markScript.Run(ctx, s.rdb, []string{k.record, k.intent},
		strconv.FormatInt(v, 10), s.channel, grant, "dead", fStatus, StatusReauthRequired, fReason, reason).Int64()
	return n == 1, err
}

// deferRefresh records a fleet-wide "do not call the provider before t" on
// version v, after a 429 or 5xx.
func (s *store) deferRefresh(ctx context.Context, grant string, k keys, v int64, t time.Time) error {
	return markScript.Run(ctx, s.rdb, []string{k.record, k.intent},
		strconv.FormatInt(v, 10), s.channel, grant, "defer", fRetry, msString(t)).Err()
}

// rewrap stores re-encrypted token fields if the record is still at
// version v (a rotation meanwhile wrote fresh ones under the active key).
func (s *store) rewrap(ctx context.Context, grant string, k keys, v int64, access, refresh string) (bool, error) {
	n, err := markScript.Run(ctx, s.rdb, []string{k.record, k.intent},
		strconv.FormatInt(v, 10), s.channel, grant, "rewrap", fAccess, access, fRefresh, refresh).Int64()
	return n == 1, err
}

// schedule records the grant's place in the refresher's schedule (the
// expiry of its access token). tm:due is in another Cluster slot than the
// grant's keys, so it is written outside the scripts; ZADD is idempotent.
func (s *store) schedule(ctx context.Context, grant string, due time.Time) error {
	return s.rdb.ZAdd(ctx, s.due, redis.Z{Score: float64(due.UnixMilli()), Member: grant}).Err()
}

// dueGrants returns up to limit grants scheduled before t, soonest first.
func (s *store) dueGrants(ctx context.Context, t time.Time, limit int64) ([]ScheduledGrant, error) {
	zs, err := s.rdb.ZRangeArgsWithScores(ctx, redis.ZRangeArgs{
		Key: s.due, Start: "-inf", Stop: strconv.FormatInt(t.UnixMilli(), 10), ByScore: true, Count: limit,
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

// scheduledGrants lists every grant in the schedule, soonest first.
func (s *store) scheduledGrants(ctx context.Context) ([]string, error) {
	return s.rdb.ZRange(ctx, s.due, 0, -1).Result()
}

// countParked counts the grants parked at the end of the schedule.
func (s *store) countParked(ctx context.Context) (int64, error) {
	return s.rdb.ZCount(ctx, s.due, strconv.FormatInt(parked.UnixMilli(), 10), "+inf").Result()
}

// subscription is the rotation channel, in the terms the Manager's loop
// needs: it hides go-redis's message types and its timeout semantics.
type subscription struct{ ps *redis.PubSub }

// subscribe opens the rotation channel; ctx bounds the subscription.
func (s *store) subscribe(ctx context.Context) *subscription {
	return &subscription{ps: s.rdb.Subscribe(ctx, s.channel)}
}

// subEvent is what one receive brought.
type subEvent int

const (
	subQuiet      subEvent = iota // nothing within the timeout: the connection may be half-open
	subFailed                     // the subscription is broken: make a new one
	subSubscribed                 // (re)subscribed: messages sent while away are lost
	subAlive                      // an answer to ping
	subMessage                    // a rotation message
	subOther                      // anything else the server sent: the connection is alive
)

// receive waits up to timeout for the next event. A half-open connection
// only ever times out (go-redis keeps a connection after a read timeout),
// so quiet is reported as such for the caller to count.
func (sub *subscription) receive(ctx context.Context, timeout time.Duration) (subEvent, string) {
	msg, err := sub.ps.ReceiveTimeout(ctx, timeout)
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return subQuiet, ""
		}
		return subFailed, ""
	}
	switch msg := msg.(type) {
	case *redis.Subscription:
		if msg.Kind == "subscribe" {
			return subSubscribed, ""
		}
	case *redis.Pong:
		return subAlive, ""
	case *redis.Message:
		return subMessage, msg.Payload
	}
	return subOther, ""
}

// ping asks the server for an answer on the subscription's connection.
func (sub *subscription) ping(ctx context.Context) { _ = sub.ps.Ping(ctx) }

func (sub *subscription) close() { _ = sub.ps.Close() }
