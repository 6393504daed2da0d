package tokenmgr

import (
	"context"
	_ "embed"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"
)

// The Lua scripts: small compare-then-act steps, one file each. go-redis
// sends EVALSHA and falls back to EVAL when the script is not cached.
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

// store is the Redis side of a Manager: every read and write of a record.
type store struct {
	rdb     redis.UniversalClient
	sealer  Sealer
	channel string // rotation messages, "GRANT VERSION"
	due     string // sorted set GRANT -> unix ms expiry of its access token (the refresher's schedule)
	prefix  string
}

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

// readMeta is read without the tokens: for operators' status views.
func (s *store) readMeta(ctx context.Context, grant string, k keys) (*record, error) {
	h, err := s.rdb.HGetAll(ctx, k.record).Result()
	if err != nil {
		return nil, err
	}
	if len(h) == 0 {
		return nil, errMissing
	}
	return decodeRecord(grant, h, nil)
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
