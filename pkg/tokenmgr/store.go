package tokenmgr

import (
	"cmp"
	"context"
	"crypto/rand"
	_ "embed"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"weak"

	"github.com/redis/go-redis/v9"
)

// store is the one door to Redis: every command and script the package
// sends to the token store goes through it (the lease's commands go
// through redsync, in lease.go). Each script is a small compare-then-act
// step in its own file with a contract header; go-redis sends EVALSHA and
// falls back to EVAL when the script is not cached.
type store struct {
	rdb        redis.UniversalClient
	sealer     Sealer
	channel    string // rotation messages, "GRANT VERSION"
	due        string // sorted set GRANT -> unix ms expiry of its access token (the refresher's schedule)
	refreshers string // hash HOLDER -> "UNTIL_MS SCOPE" of the live refreshers
	prefix     string

	// durable, when set, makes the writes that create a version wait for
	// replicas (Options.MinReplicas).
	durable *durability
	// sharded: rotation messages go to each grant's own channel
	// (Options.Messages).
	sharded bool
	// layout is where this process writes the sealed tokens
	// (Options.Layout); it reads both.
	layout Layout
}

// durability is Options.MinReplicas and ReplicaTimeout, and what to do when
// the replicas do not answer in time.
type durability struct {
	replicas int
	timeout  time.Duration
	late     func(acked int64) // fewer than replicas acknowledged in time
}

var (
	//go:embed scripts/publish.lua
	publishSrc string
	//go:embed scripts/record.lua
	recordSrc string
	//go:embed scripts/rotate.lua
	rotateSrc    string
	rotateScript = redis.NewScript(publishSrc + recordSrc + rotateSrc)
	//go:embed scripts/seed.lua
	seedSrc    string
	seedScript = redis.NewScript(publishSrc + recordSrc + seedSrc)
	//go:embed scripts/restore.lua
	restoreSrc    string
	restoreScript = redis.NewScript(publishSrc + recordSrc + restoreSrc)
	//go:embed scripts/intent.lua
	intentSrc    string
	intentScript = redis.NewScript(intentSrc)
	//go:embed scripts/mark.lua
	markSrc    string
	markScript = redis.NewScript(publishSrc + recordSrc + markSrc)
	//go:embed scripts/read.lua
	readSrc    string
	readScript = redis.NewScript(readSrc)
	//go:embed scripts/refreshers.lua
	refreshersSrc    string
	refreshersScript = redis.NewScript(refreshersSrc)
)

// keys are the Redis names of one grant. The grant sits in a hash tag, so
// all of them live in one Cluster slot and a script may touch them together.
type keys struct {
	record, lock, intent string
	rotations            string // sorted set of the last hour's rotations, for operators
	pair                 string // the sealed tokens of a LayoutPair record
}

func grantKeys(prefix, grant string) keys {
	tag := prefix + ":{" + grant + "}:"
	return keys{record: tag + "tok", lock: tag + "lock", intent: tag + "intent", rotations: tag + "rotations", pair: tag + "pair"}
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
	if cc, ok := rdb.(*redis.ClusterClient); ok {
		reloadOnFailure(cc)
	}
	// The refreshers' hash sits in the grants' key pattern (tm:{*}:*), which
	// the README's worker ACL allows: workers read it.
	return &store{rdb: rdb, sealer: s, channel: prefix + ":rotated", due: prefix + ":due", refreshers: prefix + ":{refreshers}:live", prefix: prefix}
}

var errMissing = errors.New("record missing")

// redisDenied reports a refusal by Redis: wrong credentials or a command
// the user's ACL does not allow.
func redisDenied(err error) bool { return redis.IsAuthError(err) || redis.IsPermissionError(err) }

// read returns the grant's record; errMissing when there is none, a
// *CorruptRecordError when it cannot be decoded, or the Redis error.
func (s *store) read(ctx context.Context, grant string, k keys) (*record, error) {
	rec, _, err := s.readWithLease(ctx, grant, k, false)
	return rec, err
}

// readWithLease is read, and also reports, when the lease lives in this
// Redis (withLease), whether it is held, in the same round trip.
func (s *store) readWithLease(ctx context.Context, grant string, k keys, withLease bool) (rec *record, held bool, err error) {
	ks := []string{k.record, k.pair}
	if withLease {
		ks = append(ks, k.lock)
	}
	reply, err := readScript.Run(ctx, s.rdb, ks).Slice()
	if err != nil {
		return nil, false, err
	}
	if len(reply) != 3 {
		return nil, false, fmt.Errorf("read script: unexpected reply of %d elements", len(reply))
	}
	flat, _ := reply[0].([]any)
	h := make(map[string]string, len(flat)/2)
	for i := 0; i+1 < len(flat); i += 2 {
		f, _ := flat[i].(string)
		v, _ := flat[i+1].(string)
		h[f] = v
	}
	n, _ := reply[1].(int64)
	if len(h) == 0 {
		return nil, n == 1, errMissing
	}
	pair, _ := reply[2].(string)
	_, unusable := reply[2].(int64)
	if err := withPair(grant, h, pair, unusable); err != nil {
		return nil, n == 1, err
	}
	rec, err = decodeRecord(grant, h, s.sealer)
	return rec, n == 1, err
}

// head is the part of a record the poll compares: enough to see a
// rotation, a dead mark or a new family.
type head struct {
	v      int64 // 0 when the record is missing
	status string
	family string
	failed bool // the read failed (on Cluster, one shard can fail while the others answer)
}

// readHeads reads the head of each grant's record in one pipelined round
// trip. Used by the poll.
func (s *store) readHeads(ctx context.Context, grants []string) []head {
	cmds := make([]*redis.SliceCmd, len(grants))
	_, perr := s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, g := range grants {
			cmds[i] = p.HMGet(ctx, grantKeys(s.prefix, g).record, fV, fStatus, fFamily)
		}
		return nil
	})
	out := make([]head, len(grants))
	for i, c := range cmds {
		vals, err := c.Result()
		if err == nil && perr != nil && !errors.Is(perr, redis.Nil) && (len(vals) == 0 || vals[0] == nil) {
			err = perr // maybe a connection that never set up: not "missing"
		}
		if err != nil || len(vals) != 3 {
			out[i].failed = true
			continue
		}
		vs, _ := vals[0].(string)
		out[i].status, _ = vals[1].(string)
		out[i].family, _ = vals[2].(string)
		if vs == "" {
			continue // missing
		}
		v, err := strconv.ParseInt(vs, 10, 64)
		if err != nil {
			out[i].failed = true
			continue
		}
		out[i].v = v
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
		pair    *redis.StringCmd
		intent  *redis.SliceCmd
		rotated *redis.IntCmd
	}
	rs := make([]reads, len(grants))
	since := "(" + strconv.FormatInt(now.Add(-rotationWindow).UnixMilli(), 10) // the last hour, exclusive
	// A connection that fails to set up (a wrong password) leaves the
	// commands without an error of their own: the pipeline's error is
	// every grant's, never an empty record read as "no such grant".
	_, perr := s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, g := range grants {
			k := grantKeys(s.prefix, g)
			rs[i] = reads{
				record:  p.HGetAll(ctx, k.record),
				pair:    p.Get(ctx, k.pair),
				intent:  p.HMGet(ctx, k.intent, "holder", "from_v", "started_at"),
				rotated: p.ZCount(ctx, k.rotations, since, "+inf"),
			}
		}
		return nil
	})
	for i, r := range rs {
		err := r.record.Err()
		if err != nil {
			errs[i] = err
			continue
		}
		h, pair := r.record.Val(), r.pair
		if len(h) == 0 && perr != nil && !errors.Is(perr, redis.Nil) {
			// Empty, but the pipeline failed somewhere: a connection that
			// failed to set up leaves its commands empty without an error.
			// Ask again alone, where the error shows.
			k := grantKeys(s.prefix, grants[i])
			if h, err = s.rdb.HGetAll(ctx, k.record).Result(); err != nil {
				errs[i] = err
				continue
			}
			pair = s.rdb.Get(ctx, k.pair)
		}
		if len(h) == 0 {
			errs[i] = &NotFoundError{Grant: grants[i]}
			continue
		}
		if err := pairReadErr(pair); err != nil {
			errs[i] = err // not "no pair key": the tokens may well be there
			continue
		}
		if err := withPair(grants[i], h, pair.Val(), unusablePair(pair)); err != nil {
			errs[i] = err
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
// values as they are, in either layout, and the layout they are in, for
// rewrap to see which key sealed them and where they live.
func (s *store) sealedTokenFields(ctx context.Context, grant string, k keys) (access, refresh string, layout Layout, err error) {
	var fields *redis.SliceCmd
	var pair *redis.StringCmd
	_, perr := s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		fields = p.HMGet(ctx, k.record, fV, fStatus, fAccess, fRefresh)
		pair = p.Get(ctx, k.pair)
		return nil
	})
	if errors.Is(perr, redis.Nil) || wrongType(perr) {
		perr = nil // the pair key's answers, read below
	}
	if err := cmp.Or(perr, fields.Err(), pairReadErr(pair)); err != nil {
		return "", "", 0, err
	}
	h := map[string]string{}
	for i, name := range []string{fV, fStatus, fAccess, fRefresh} {
		if v, ok := fields.Val()[i].(string); ok {
			h[name] = v
		}
	}
	layout = LayoutPair
	_, at := h[fAccess]
	_, rt := h[fRefresh]
	if at || rt {
		layout = LayoutHash // as withPair decides
	}
	if err := withPair(grant, h, pair.Val(), unusablePair(pair)); err != nil {
		return "", "", 0, err
	}
	return h[fAccess], h[fRefresh], layout, nil
}

// pairReadErr is the error of a GET of a pair key, unless it only says
// there is no pair (none, or a key of another type: unusablePair).
func pairReadErr(get *redis.StringCmd) error {
	if err := get.Err(); err != nil && !errors.Is(err, redis.Nil) && !wrongType(err) {
		return err
	}
	return nil
}

// unusablePair reports a pair key that exists but cannot hold a pair: empty
// (no writer leaves it so) or of another type.
func unusablePair(get *redis.StringCmd) bool {
	return wrongType(get.Err()) || (get.Err() == nil && get.Val() == "")
}

// wrongType reports Redis's answer to a command on a key of another type.
func wrongType(err error) bool {
	var re redis.Error
	return errors.As(err, &re) && strings.HasPrefix(re.Error(), "WRONGTYPE")
}

type casResult int

const (
	casWritten  casResult = iota
	casConflict           // another writer moved the version on
	casMissing            // the record is gone
)

// rotate writes rec as the successor of version fromV of rec's family
// (invariant 1). counted is false when the rotations set refused the
// rotation (a Redis user without ZREMRANGEBYSCORE): the write itself stands.
func (s *store) rotate(ctx context.Context, grant string, k keys, fromV int64, rec *record) (res casResult, v int64, counted bool, err error) {
	f, err := rec.fields(grant, s.sealer)
	if err != nil {
		return 0, 0, false, err
	}
	next := *rec
	next.V = fromV + 1
	msg, err := message(grant, &next, f)
	if err != nil {
		return 0, 0, false, err
	}
	args := append([]any{strconv.FormatInt(fromV, 10), rec.Family, s.publishTo(grant), msg, rec.RotatedAt.UnixMilli(), rotationWindow.Milliseconds(), s.layout.String()}, f...)
	reply, err := s.runDurable(ctx, rotateScript, []string{k.record, k.intent, k.rotations, k.pair}, args...).Int64Slice()
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

// seed creates or replaces the record as a new token family and returns
// its version and family. The family is named after the Redis server's
// clock (later than the family it replaces), and the tokens are sealed for
// that family and version, so they are known before the script runs; the
// script refuses if the record changed meanwhile, and seed tries again.
func (s *store) seed(ctx context.Context, grant string, k keys, rec *record) (int64, string, error) {
	for range 3 {
		var now *redis.TimeCmd
		var cur *redis.SliceCmd
		if _, err := s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
			now = p.Time(ctx)
			cur = p.HMGet(ctx, k.record, fV, fFamily)
			return nil
		}); err != nil {
			return 0, "", err
		}
		vals := cur.Val()
		storedV, _ := vals[0].(string)
		storedFamily, _ := vals[1].(string)
		var v int64
		if storedV != "" {
			var err error
			if v, err = strconv.ParseInt(storedV, 10, 64); err != nil || v < 0 {
				v = 0 // a corrupt version: the seed replaces it
			}
		}
		ms := now.Val().UnixMilli()
		if e := familyEpoch(storedFamily); e >= ms {
			ms = e + 1
		}
		rec.V, rec.Family = v+1, strconv.FormatInt(ms, 10)+"."+newFamilyID()
		f, err := rec.fields(grant, s.sealer)
		if err != nil {
			return 0, "", err
		}
		msg, err := message(grant, rec, f)
		if err != nil {
			return 0, "", err
		}
		args := append([]any{storedV, storedFamily, s.publishTo(grant), msg, rec.V, s.layout.String()}, f...)
		ok, err := s.runDurable(ctx, seedScript, []string{k.record, k.intent, k.pair}, args...).Int64()
		if err != nil {
			return 0, "", err
		}
		if ok == 1 {
			return rec.V, rec.Family, nil
		}
	}
	return 0, "", errors.New("the record kept changing; try again")
}

// newFamilyID is the random part of a family's name.
func newFamilyID() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// restore puts rec back at its version if the stored record is missing or
// older than rec (invariant 9).
func (s *store) restore(ctx context.Context, grant string, k keys, rec *record) (bool, error) {
	f, err := rec.fields(grant, s.sealer)
	if err != nil {
		return false, err
	}
	restored := *rec
	restored.Restored = true
	msg, err := message(grant, &restored, append(f, fRestored, "1"))
	if err != nil {
		return false, err
	}
	args := append([]any{strconv.FormatInt(rec.V, 10), rec.Family, s.publishTo(grant), msg, s.layout.String()}, f...)
	res, err := s.runDurable(ctx, restoreScript, []string{k.record, k.pair}, args...).Int64Slice()
	if err != nil {
		return false, err
	}
	return len(res) > 0 && res[0] == 1, nil
}

// runDurable runs a script that creates a version, or the intent to spend
// a refresh token (which a successor must find after a failover). With
// MinReplicas it then waits, on the same connection (WAIT counts the writes
// of its own connection), until that many replicas have the write or
// ReplicaTimeout passes: a failover soon after then finds it on a replica. It
// narrows the window in which Redis can lose a rotation; it does not close
// it (Sentinel may still promote a replica that did not acknowledge).
func (s *store) runDurable(ctx context.Context, script *redis.Script, keys []string, args ...any) *redis.Cmd {
	if s.durable == nil {
		return script.Run(ctx, s.rdb, keys, args...)
	}
	// One pipeline runs on one connection: the script, then WAIT for it.
	// (A pinned Conn would do too, but go-redis's Conn shares the
	// client's options without its lock.)
	var node redis.Cmdable = s.rdb
	if c, ok := s.rdb.(*redis.ClusterClient); ok {
		n, err := c.MasterForKey(ctx, keys[0])
		if err != nil {
			cmd := redis.NewCmd(ctx)
			cmd.SetErr(err)
			return cmd
		}
		node = n
	}
	var cmd *redis.Cmd
	var wait *redis.IntCmd
	_, _ = node.Pipelined(ctx, func(p redis.Pipeliner) error {
		cmd = script.Eval(ctx, p, keys, args...)
		wait = redis.NewIntCmd(ctx, "wait", s.durable.replicas, s.durable.timeout.Milliseconds())
		_ = p.Process(ctx, wait)
		return nil
	})
	if cmd.Err() != nil {
		return cmd
	}
	if acked, err := wait.Result(); err != nil || acked < int64(s.durable.replicas) {
		s.durable.late(acked)
	}
	return cmd
}

// announce records this holder as a live refresher for ttl, serving
// grants (nil: every grant in the schedule).
func (s *store) announce(ctx context.Context, holder string, grants []string, ttl time.Duration) error {
	scope := "*"
	if grants != nil {
		scope = strings.Join(grants, " ")
	}
	return refreshersScript.Run(ctx, s.rdb, []string{s.refreshers}, "beat", holder, ttl.Milliseconds(), scope).Err()
}

// liveRefreshers returns the scopes of the live refreshers: "*" or grant
// names separated by spaces.
func (s *store) liveRefreshers(ctx context.Context) ([]string, error) {
	return refreshersScript.Run(ctx, s.rdb, []string{s.refreshers}, "live").StringSlice()
}

// intent is what beginRefresh learned of earlier attempts at a version.
type intent struct {
	// DoubtHolder and DoubtSince name the earliest earlier attempt whose
	// outcome is unknown: the provider may have rotated the token then,
	// and its answer may be lost or still held by DoubtHolder. Empty when
	// every earlier attempt ended in a definite answer.
	DoubtHolder string
	DoubtSince  time.Time
	Attempts    int64 // attempts at this version, this one included
}

// inDoubt reports whether an earlier attempt may have spent the token.
func (in intent) inDoubt() bool { return !in.DoubtSince.IsZero() }

// beginRefresh records the intent to spend the refresh token of version v
// of family. errMissing or a conflict (ok false) means the record changed
// underneath.
func (s *store) beginRefresh(ctx context.Context, k keys, v int64, family, holder string, now time.Time, ttl time.Duration) (intent, bool, error) {
	// Durable like a rotation: an intent a failover lost would let a
	// successor on the promoted replica spend the same token again.
	res, err := s.runDurable(ctx, intentScript, []string{k.record, k.intent},
		"begin", strconv.FormatInt(v, 10), family, holder, now.UnixMilli(), ttl.Milliseconds()).Slice()
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
	in.DoubtHolder, _ = res[1].(string)
	since, _ := res[2].(string)
	t, err := parseMS(since)
	if err != nil {
		return intent{}, false, fmt.Errorf("intent doubt_since: %w", err)
	}
	in.DoubtSince = t
	in.Attempts, _ = res[3].(int64)
	return in, true, nil
}

// settleIntent records that holder's attempt at version v got a definite
// answer without a rotation: the token is not spent by it.
func (s *store) settleIntent(ctx context.Context, k keys, v int64, family, holder string) error {
	return intentScript.Run(ctx, s.rdb, []string{k.record, k.intent},
		"settle", strconv.FormatInt(v, 10), family, holder, 0, 0).Err()
}

// markDead records that the grant at version v needs re-consent because the
// provider refused its refresh token, and why. The mark takes a new
// version (returned), so no write decided before it lands.
func (s *store) markDead(ctx context.Context, grant string, k keys, v int64, family, reason string) (int64, error) {
	return s.mark(ctx, grant, k, v, family, "dead", fStatus, StatusReauthRequired, fReason, reason)
}

// markLost records that the grant at version v needs re-consent because an
// answer that may have rotated its token was lost. The version stays: the
// holder of that answer, if alive, can still write it.
func (s *store) markLost(ctx context.Context, grant string, k keys, v int64, family, reason string) (bool, error) {
	nv, err := s.mark(ctx, grant, k, v, family, "lost", fStatus, StatusReauthRequired, fReason, reason)
	return nv != 0, err
}

// deferRefresh records a fleet-wide "do not call the provider before t" on
// version v, after a 429 or 5xx.
func (s *store) deferRefresh(ctx context.Context, grant string, k keys, v int64, family string, t time.Time) error {
	_, err := s.mark(ctx, grant, k, v, family, "defer", fRetry, msString(t))
	return err
}

// rewrap stores re-encrypted token fields if the record is still at
// version v (a rotation meanwhile wrote fresh ones under the active key).
func (s *store) rewrap(ctx context.Context, grant string, k keys, v int64, family, access, refresh string) (bool, error) {
	nv, err := s.mark(ctx, grant, k, v, family, "rewrap", fAccess, access, fRefresh, refresh)
	return nv != 0, err
}

// mark runs mark.lua; 0 means the record moved on.
func (s *store) mark(ctx context.Context, grant string, k keys, v int64, family, mode string, fields ...any) (int64, error) {
	args := append([]any{strconv.FormatInt(v, 10), family, s.publishTo(grant), grant, mode, s.layout.String()}, fields...)
	return markScript.Run(ctx, s.rdb, []string{k.record, k.intent, k.pair}, args...).Int64()
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

// lostTokensTail ends the message "GRANT V tokens_lost": a process found
// version V alive without its tokens and could not put them back; one that
// holds them reads the record, which restores them (refresh.go: readLease).
const lostTokensTail = "tokens_lost"

// announceLostTokens sends "GRANT V tokens_lost" where the grant's rotation
// messages go.
func (s *store) announceLostTokens(ctx context.Context, grant string, v int64) error {
	msg := grant + " " + strconv.FormatInt(v, 10) + " " + lostTokensTail
	if s.sharded {
		return s.rdb.SPublish(ctx, s.grantChannel(grant), msg).Err()
	}
	return s.rdb.Publish(ctx, s.channel, msg).Err()
}

// subscription is the rotation channel, in the terms the Manager's loop
// needs: it hides go-redis's message types and its timeout semantics.
type subscription struct {
	ps    *redis.PubSub
	store *store
}

// grantChannel is a grant's own rotation channel, in its hash slot: with
// sharded messages (SPUBLISH, SSUBSCRIBE) only its subscribers hear it, and
// on Cluster only its shard carries it.
func (s *store) grantChannel(grant string) string { return s.prefix + ":{" + grant + "}:rotated" }

// publishTo tells the scripts where a grant's rotation messages go.
func (s *store) publishTo(grant string) string {
	if s.sharded {
		return "s:" + s.grantChannel(grant)
	}
	return "p:" + s.channel
}

// subscribe opens the global rotation channel. ctx bounds the
// subscription.
func (s *store) subscribe(ctx context.Context) *subscription {
	return &subscription{ps: s.rdb.Subscribe(ctx, s.channel)}
}

// shardOf names the server that carries a grant's sharded channel: its
// slot's master on Cluster, "" for a single server. Grants of one server
// share one subscription, so a process holds one connection per node, not
// one per grant.
func (s *store) shardOf(ctx context.Context, grant string) (string, error) {
	c, ok := s.rdb.(*redis.ClusterClient)
	if !ok {
		return "", nil
	}
	node, err := c.MasterForKey(ctx, s.grantChannel(grant))
	if err != nil {
		return "", err
	}
	return node.Options().Addr, nil
}

// subscribeShard opens a sharded subscription to grant's channel on the
// server that carries it (shardOf); add subscribes more of that server's
// grants on the same connection.
func (s *store) subscribeShard(ctx context.Context, grant string) (*subscription, error) {
	ch := s.grantChannel(grant)
	c, ok := s.rdb.(*redis.ClusterClient)
	if !ok {
		return &subscription{ps: s.rdb.SSubscribe(ctx, ch), store: s}, nil
	}
	node, err := c.MasterForKey(ctx, ch)
	if err != nil {
		return nil, err
	}
	return &subscription{ps: node.SSubscribe(ctx, ch), store: s}, nil
}

// add subscribes grant's sharded channel on this subscription's connection.
func (sub *subscription) add(ctx context.Context, grant string) error {
	return sub.ps.SSubscribe(ctx, sub.store.grantChannel(grant))
}

// grantOf is the grant whose sharded channel ch is ("" if none).
func (s *store) grantOf(ch string) string {
	g, ok := strings.CutPrefix(ch, s.prefix+":{")
	if !ok {
		return ""
	}
	g, ok = strings.CutSuffix(g, "}:rotated")
	if !ok {
		return ""
	}
	return g
}

// serverMajor is the major version of (one node of) the Redis server.
func (s *store) serverMajor(ctx context.Context) (int, error) {
	info, err := s.rdb.Info(ctx, "server").Result()
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(info, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "redis_version:"); ok {
			major, _, _ := strings.Cut(v, ".")
			return strconv.Atoi(major)
		}
	}
	return 0, errors.New("INFO server has no redis_version")
}

// isCluster reports a Redis Cluster client.
func (s *store) isCluster() bool {
	_, ok := s.rdb.(*redis.ClusterClient)
	return ok
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
// so quiet is reported as such for the caller to count. channel is the
// channel a subscription confirmation or a message came on.
func (sub *subscription) receive(ctx context.Context, timeout time.Duration) (ev subEvent, payload, channel string) {
	msg, err := sub.ps.ReceiveTimeout(ctx, timeout)
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return subQuiet, "", ""
		}
		return subFailed, "", ""
	}
	switch msg := msg.(type) {
	case *redis.Subscription:
		if msg.Kind == "subscribe" || msg.Kind == "ssubscribe" {
			return subSubscribed, "", msg.Channel
		}
	case *redis.Pong:
		return subAlive, "", ""
	case *redis.Message:
		return subMessage, msg.Payload, msg.Channel
	}
	return subOther, "", ""
}

// ping asks the server for an answer on the subscription's connection.
func (sub *subscription) ping(ctx context.Context) { _ = sub.ps.Ping(ctx) }

func (sub *subscription) close() { _ = sub.ps.Close() }

// reloadOnFailure makes a Cluster client reload its slot map as soon as a
// command fails in a way that may mean the map is stale (a dead or demoted
// master). go-redis otherwise keeps sending a failed master's slots to it
// until a MOVED reply or its periodic reload (ClusterStateReloadInterval,
// 60 s by default): after a failover, the process holding the newest pair
// could not reach the promoted replica for longer than a token lives, while
// a process started after the failover read the rolled-back record and
// spent its refresh token (integration/failover_test.go, scenario 12).
// Each client is hooked once, however many Managers and Admins share it.
func reloadOnFailure(cc *redis.ClusterClient) {
	wp := weak.Make(cc)
	if _, loaded := reloadHooked.LoadOrStore(wp, struct{}{}); loaded {
		return
	}
	runtime.AddCleanup(cc, func(wp weak.Pointer[redis.ClusterClient]) { reloadHooked.Delete(wp) }, wp)
	cc.AddHook(&clusterReloader{client: cc})
}

// reloadHooked holds the Cluster clients reloadOnFailure has hooked, weakly:
// the set must not keep a client alive.
var reloadHooked sync.Map

// clusterReloader is the hook of reloadOnFailure.
type clusterReloader struct {
	client *redis.ClusterClient
	last   atomic.Int64 // unix ns of the last reload asked; one per reloadEvery
}

// reloadEvery bounds the reloads a burst of failures asks for (go-redis
// also coalesces them).
const reloadEvery = 250 * time.Millisecond

func (h *clusterReloader) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h *clusterReloader) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		h.after(err)
		return err
	}
}

func (h *clusterReloader) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		err := next(ctx, cmds)
		h.after(err)
		return err
	}
}

func (h *clusterReloader) after(err error) {
	if !topologySuspect(err) {
		return
	}
	now := time.Now().UnixNano()
	last := h.last.Load()
	if now-last < int64(reloadEvery) || !h.last.CompareAndSwap(last, now) {
		return
	}
	h.client.ReloadState(context.Background())
}

// topologySuspect reports an error that a stale slot map can cause: the
// connection failed or timed out, or the node answered that the cluster or
// its master is down. A reply about the command itself (a script error, an
// ACL refusal, a missing key) says nothing about the map.
func topologySuspect(err error) bool {
	if err == nil || errors.Is(err, redis.Nil) || errors.Is(err, context.Canceled) {
		return false
	}
	var re redis.Error
	if errors.As(err, &re) {
		msg := re.Error()
		for _, p := range []string{"CLUSTERDOWN", "MASTERDOWN", "TRYAGAIN", "LOADING"} {
			if strings.HasPrefix(msg, p) {
				return true
			}
		}
		return false
	}
	return true
}
