package main

import (
	"context"
	"errors"
	"hash/fnv"
	"log/slog"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/time/rate"

	"github.com/tokenmgr/tokenmgr/internal/cli"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
)

// scheduler pre-rotates grants before their access tokens expire, reading
// the schedule (tm:due, a sorted set by expiry) rather than scanning keys.
// Pre-rotating every grant once per token lifetime also keeps idle grants
// alive long before the provider's inactivity expiry.
//
// Any number of refresher replicas and workers can run together: every
// refresh goes through the Manager's lease and fenced write.
type scheduler struct {
	m       *tokenmgr.Manager
	now     func() time.Time
	margin  time.Duration // the Manager's RefreshBefore: candidates expire within it
	jitter  time.Duration // each grant's refresh is delayed by a stable [0, jitter) past its due time
	batch   int64         // candidates read per tick
	sem     chan struct{} // concurrency limit
	limiter *rate.Limiter // provider rate limit
	log     *slog.Logger
	metrics *metrics
	// tracer makes a span per scheduled refresh, the parent of the
	// Manager's tokenmgr.refresh; its logs carry the trace id.
	tracer trace.Tracer
	// warnAbsolute: log a warning when a grant's absolute expiry (forced
	// re-consent) is closer than this.
	warnAbsolute time.Duration
	// period is the loop's tick: jitter stays a tick clear of the
	// workers' margin.
	period time.Duration
	// only, when set, limits the scheduler to these grants (--grant, or
	// the grants of one registration in --config); others in the shared
	// schedule belong to other refreshers.
	only map[string]bool
	// holder is the Manager's holder name, to tell our rotations from
	// other replicas' and workers'.
	holder string

	wg sync.WaitGroup // in-flight refreshes

	// wake tells the loop that a refresh finished, so that the grant's
	// next due time can move its timer.
	wake chan struct{}
	// lastTick is when the loop last finished a tick (unix nanos, by
	// wall): /healthz fails when it is too long ago.
	lastTick atomic.Int64
	// wall is the clock of lastTick: time.Now but in tests (the Manager's
	// clock, now, may stand still there).
	wall func() time.Time

	mu sync.Mutex // guards the fields below
	// notBefore holds back a grant that was looked at and is not due yet,
	// or that the provider asked to wait (Retry-After): ticks skip it.
	notBefore map[string]time.Time
	running   map[string]bool
}

// parkedUntil is far in the future: where grants with nothing to refresh
// wait in the schedule.
var parkedUntil = time.Unix(1<<35, 0)

// invalidParked is where members of the schedule that cannot name a grant
// wait: at its end, but before parkedUntil, so that
// tokenmgr_grants_reauth_required (the members at parkedUntil and later)
// does not count them.
var invalidParked = parkedUntil.Add(-24 * time.Hour)

// jitterFor is a stable offset in [0, bound) for one version of a grant:
// replicas agree on it, and it spreads many grants with equal expiries.
// bound is --jitter, capped at half the grant's refresh margin, so that
// short-lived tokens are still refreshed ahead of the workers.
func (s *scheduler) jitterFor(grant string, version int64, margin time.Duration) time.Duration {
	bound := min(s.jitter, margin/2-s.period)
	if bound <= 0 {
		return 0
	}
	h := fnv.New64a()
	h.Write([]byte(grant))
	h.Write([]byte(strconv.FormatInt(version, 10)))
	return time.Duration(h.Sum64() % uint64(bound))
}

// tick starts refreshes of the grants that are due now and returns how
// many it started. It never waits for a refresh: when --concurrency are in
// flight it stops, and the loop ticks again as soon as one finishes. Its
// own Redis commands are bounded by readTimeout, so that a tick ends
// while Redis hangs (the loop must keep ticking: /healthz, and the
// announcement that keeps workers off the provider).
func (s *scheduler) tick(ctx context.Context) int {
	now := s.now()
	tctx, cancel := context.WithTimeout(ctx, readTimeout(s.period))
	defer cancel()
	due, err := s.m.DueGrants(tctx, now.Add(s.margin), s.batch)
	if err != nil {
		s.log.Warn("could not read the schedule", logErr(err))
		return 0
	}
	started := 0
	for _, d := range due {
		if err := tokenmgr.ValidateGrantName(d.Grant); err != nil {
			// No refresher can serve it, and left at the head it would
			// take a place of every batch.
			s.parkInvalid(tctx, d.Grant, err)
			continue
		}
		if s.only != nil && !s.only[d.Grant] {
			continue
		}
		s.mu.Lock()
		skip := s.running[d.Grant] || now.Before(s.notBefore[d.Grant])
		if !skip {
			s.running[d.Grant] = true
		}
		s.mu.Unlock()
		if skip {
			continue
		}
		select {
		case s.sem <- struct{}{}:
		default: // --concurrency in flight: the rest at the next tick
			s.mu.Lock()
			delete(s.running, d.Grant)
			s.mu.Unlock()
			return started
		}
		started++
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer func() { <-s.sem }()
			s.done(d.Grant, s.process(ctx, d))
		}()
	}
	return started
}

// parkInvalid moves a member that is not a grant name to the end of the
// schedule, with one log line.
func (s *scheduler) parkInvalid(ctx context.Context, member string, invalid error) {
	if err := s.m.Postpone(ctx, member, invalidParked); err != nil {
		s.log.Warn("could not park an invalid name in the schedule", "member", cli.Shown(member), logErr(err))
		return
	}
	s.log.Warn("parked an invalid grant name at the end of the schedule (remove it with ZREM)", "member", cli.Shown(member), logErr(invalid))
}

func (s *scheduler) done(grant string, notBefore time.Time) {
	s.mu.Lock()
	delete(s.running, grant)
	if notBefore.IsZero() {
		delete(s.notBefore, grant)
	} else {
		s.notBefore[grant] = notBefore
	}
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// process looks at one candidate: refreshes it if due (with its jitter),
// and returns when to look at it again (zero: at the next tick).
func (s *scheduler) process(ctx context.Context, d tokenmgr.ScheduledGrant) time.Time {
	grant := d.Grant
	name := cli.Shown(grant) // for logs: valid names may still hold control characters
	st, err := s.m.Status(ctx, grant)
	if err != nil {
		if errors.Is(err, tokenmgr.ErrGrantNotFound) {
			// Scheduled but no record: park it so it cannot crowd the
			// head of the schedule; a seed puts it back.
			s.log.Warn("scheduled grant has no record; parked until it is seeded", "grant", name)
			s.metrics.outcome("not_found")
			if err := s.m.Postpone(ctx, grant, parkedUntil); err != nil {
				return s.now().Add(time.Minute)
			}
			return time.Time{}
		}
		s.log.Warn("could not read grant", "grant", name, logErr(err))
		s.metrics.outcome("error")
		return s.now().Add(5 * time.Second)
	}
	s.metrics.observe(st)
	if st.Status == tokenmgr.StatusOK {
		s.correct(ctx, d, st)
	}
	if st.Status != tokenmgr.StatusOK {
		if err := s.m.Postpone(ctx, grant, parkedUntil); err != nil { // normally parked already
			return s.now().Add(time.Minute)
		}
		return time.Time{}
	}
	if left := st.AbsoluteExpiry.Sub(s.now()); !st.AbsoluteExpiry.IsZero() && left < s.warnAbsolute {
		s.log.Warn("grant reaches its absolute expiry soon; re-consent before then or the fleet stops",
			"grant", name, "absolute_expiry", st.AbsoluteExpiry, "days_left", int(left.Hours()/24))
	}
	if st.RetryAt.After(s.now()) {
		// The fleet backs off (a 429 or 5xx seen by anyone): wait it out.
		s.metrics.outcome("backing_off")
		return st.RetryAt
	}
	dueAt := s.m.RefreshDueAt(st)
	dueAt = dueAt.Add(s.jitterFor(grant, st.Version, st.Expiry.Sub(dueAt)))
	if now := s.now(); now.Before(dueAt) {
		return dueAt
	}
	// Refreshes made in the name of the schedule are not cancelled by
	// shutdown: an in-flight one finishes and is written.
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
	defer cancel()
	rctx, span := s.tracer.Start(rctx, "refresher.scheduled_refresh", trace.WithAttributes(
		attribute.String("tokenmgr.grant", grant), attribute.Int64("tokenmgr.version", st.Version)))
	defer span.End()
	if err := s.limiter.Wait(rctx); err != nil {
		return time.Time{}
	}
	after, err := s.m.RefreshIfDue(rctx, grant)
	if err != nil {
		span.SetStatus(codes.Error, cli.Shown(err.Error()))
	}
	var re *tokenmgr.RefreshError
	switch {
	case err == nil && after.Version != st.Version:
		s.metrics.observe(after)
		if after.RotatedBy != s.holder {
			s.metrics.outcome("rotated_elsewhere") // another replica or a worker got there first
			return time.Time{}
		}
		s.metrics.outcome("refreshed")
		s.log.InfoContext(rctx, "grant pre-rotated", "grant", name, "version", after.Version, "expiry", after.Expiry)
		return time.Time{}
	case err == nil && after.RetryAt.After(s.now()):
		s.metrics.outcome("backing_off")
		return after.RetryAt
	case err == nil:
		s.metrics.outcome("not_due")
		next := s.m.RefreshDueAt(after)
		if soon := s.now().Add(s.period); next.Before(soon) {
			next = soon
		}
		return next
	case errors.Is(err, tokenmgr.ErrReauthRequired):
		s.metrics.outcome("reauth_required")
		s.log.ErrorContext(rctx, "grant needs re-consent", "grant", name, logErr(err))
		return time.Time{}
	case errors.As(err, &re):
		if re.Config {
			s.metrics.outcome("config_error")
		} else {
			s.metrics.outcome("transient_error")
		}
		wait := max(re.RetryAfter, time.Second)
		s.log.WarnContext(rctx, "refresh failed; postponed", "grant", name, "retry_in", wait, logErr(err))
		return s.now().Add(wait)
	default:
		s.metrics.outcome("error")
		s.log.WarnContext(rctx, "refresh failed", "grant", name, logErr(err))
		return s.now().Add(5 * time.Second)
	}
}

// correct moves a grant whose place in the schedule is not its token's
// expiry: workers may not write the schedule (the README's ACL), so after
// a worker's rotation it holds the old expiry, and the grant would come
// back every tick until the new token is due.
func (s *scheduler) correct(ctx context.Context, d tokenmgr.ScheduledGrant, st tokenmgr.GrantStatus) {
	want := st.Expiry
	if want.IsZero() {
		want = parkedUntil
	}
	if d.Expiry.UnixMilli() == want.UnixMilli() {
		return
	}
	if err := s.m.Postpone(ctx, d.Grant, want); err != nil {
		s.log.Warn("could not correct the grant's place in the schedule", "grant", cli.Shown(d.Grant), logErr(err))
	}
}

// loop ticks until ctx ends, then waits for in-flight refreshes. It ticks
// at the earliest due time of the grants it has looked at (a timer on the
// head of the schedule), and at least every `every`: a grant is refreshed
// when it comes due, not up to a tick later, which matters for short
// tokens. Each tick first announces this refresher, so that workers leave
// the grants it serves to it (invariant 11 in pkg/tokenmgr/doc.go).
func (s *scheduler) loop(ctx context.Context, every time.Duration) {
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			s.wg.Wait()
			return
		case <-t.C:
		case <-s.wake:
		}
		s.step(ctx, every)
		t.Reset(s.untilNext(every))
	}
}

// step is one turn of the loop: announce, start what is due, and record
// the tick for /healthz.
func (s *scheduler) step(ctx context.Context, every time.Duration) {
	s.announce(ctx, every)
	s.tick(ctx)
	s.lastTick.Store(s.wallNow().UnixNano())
}

func (s *scheduler) wallNow() time.Time {
	if s.wall == nil {
		return time.Now()
	}
	return s.wall()
}

// readTimeout bounds the schedule read of one tick.
func readTimeout(every time.Duration) time.Duration { return max(every, 3*time.Second) }

// untilNext is how long the loop may sleep: until the earliest time a grant
// it looked at comes due, at most every.
func (s *scheduler) untilNext(every time.Duration) time.Duration {
	now := s.now()
	next := now.Add(every)
	s.mu.Lock()
	for _, nb := range s.notBefore {
		if nb.After(now) && nb.Before(next) {
			next = nb
		}
	}
	s.mu.Unlock()
	return max(next.Sub(now), time.Millisecond)
}

// announceFor is how long an announcement lasts: a few ticks, and at least
// a few seconds, so that a busy tick is not taken for a dead refresher.
func announceFor(every time.Duration) time.Duration { return max(3*every, 3*time.Second) }

// announce tells workers that this refresher serves its grants (all of the
// schedule when it has no list) for the next few ticks.
func (s *scheduler) announce(ctx context.Context, every time.Duration) {
	var grants []string
	if s.only != nil {
		for g := range s.only {
			grants = append(grants, g)
		}
		slices.Sort(grants)
	}
	actx, cancel := context.WithTimeout(ctx, every)
	defer cancel()
	if err := s.m.Announce(actx, grants, announceFor(every)); err != nil && ctx.Err() == nil {
		s.log.Warn("could not announce this refresher; workers refresh for themselves", logErr(err))
	}
}
