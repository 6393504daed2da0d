package main

import (
	"context"
	"errors"
	"hash/fnv"
	"log/slog"
	"strconv"
	"sync"
	"time"

	"golang.org/x/time/rate"

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
	// warnAbsolute: log a warning when a grant's absolute expiry (forced
	// re-consent) is closer than this.
	warnAbsolute time.Duration

	wg sync.WaitGroup // in-flight refreshes

	mu sync.Mutex // guards the fields below
	// notBefore holds back a grant that was looked at and is not due yet,
	// or that the provider asked to wait (Retry-After): ticks skip it.
	notBefore map[string]time.Time
	running   map[string]bool
}

// jitterFor is a stable offset in [0, bound) for one version of a grant:
// replicas agree on it, and it spreads many grants with equal expiries.
// bound is --jitter, capped at half the grant's refresh margin, so that
// short-lived tokens are still refreshed ahead of the workers.
func (s *scheduler) jitterFor(grant string, version int64, margin time.Duration) time.Duration {
	bound := min(s.jitter, margin/2)
	if bound <= 0 {
		return 0
	}
	h := fnv.New64a()
	h.Write([]byte(grant))
	h.Write([]byte(strconv.FormatInt(version, 10)))
	return time.Duration(h.Sum64() % uint64(bound))
}

// tick starts refreshes of the grants that are due now and returns how
// many it started. It never blocks on a refresh.
func (s *scheduler) tick(ctx context.Context) int {
	now := s.now()
	due, err := s.m.DueGrants(ctx, now.Add(s.margin), s.batch)
	if err != nil {
		s.log.Warn("could not read the schedule", "err", err)
		return 0
	}
	started := 0
	for _, d := range due {
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
		case <-ctx.Done():
			s.done(d.Grant, time.Time{})
			return started
		}
		started++
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer func() { <-s.sem }()
			s.done(d.Grant, s.process(ctx, d.Grant))
		}()
	}
	return started
}

func (s *scheduler) done(grant string, notBefore time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.running, grant)
	if notBefore.IsZero() {
		delete(s.notBefore, grant)
	} else {
		s.notBefore[grant] = notBefore
	}
}

// process looks at one candidate: refreshes it if due (with its jitter),
// and returns when to look at it again (zero: at the next tick).
func (s *scheduler) process(ctx context.Context, grant string) time.Time {
	st, err := s.m.Status(ctx, grant)
	if err != nil {
		if errors.Is(err, tokenmgr.ErrGrantNotFound) {
			s.log.Warn("scheduled grant has no record; removing it from the schedule is an operator's call", "grant", grant)
			return s.now().Add(time.Minute)
		}
		s.log.Warn("could not read grant", "grant", grant, "err", err)
		s.metrics.outcome("error")
		return s.now().Add(5 * time.Second)
	}
	s.metrics.observe(st, s.now())
	if st.Status != tokenmgr.StatusOK {
		return time.Time{} // parked at the end of the schedule
	}
	if left := st.AbsoluteExpiry.Sub(s.now()); !st.AbsoluteExpiry.IsZero() && left < s.warnAbsolute {
		s.log.Warn("grant reaches its absolute expiry soon; re-consent before then or the fleet stops",
			"grant", grant, "absolute_expiry", st.AbsoluteExpiry, "days_left", int(left.Hours()/24))
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
	if err := s.limiter.Wait(rctx); err != nil {
		return time.Time{}
	}
	after, err := s.m.RefreshIfDue(rctx, grant)
	var re *tokenmgr.RefreshError
	switch {
	case err == nil && after.Version != st.Version:
		s.metrics.outcome("refreshed")
		s.metrics.observe(after, s.now())
		s.log.Info("grant pre-rotated", "grant", grant, "version", after.Version, "expiry", after.Expiry)
		return time.Time{}
	case err == nil:
		s.metrics.outcome("not_due")
		return s.m.RefreshDueAt(after)
	case errors.Is(err, tokenmgr.ErrReauthRequired):
		s.metrics.outcome("reauth_required")
		s.log.Error("grant needs re-consent", "grant", grant, "err", err)
		return time.Time{}
	case errors.As(err, &re):
		if re.Config {
			s.metrics.outcome("config_error")
		} else {
			s.metrics.outcome("transient_error")
		}
		wait := max(re.RetryAfter, time.Second)
		s.log.Warn("refresh failed; postponed", "grant", grant, "retry_in", wait, "err", err)
		return s.now().Add(wait)
	default:
		s.metrics.outcome("error")
		s.log.Warn("refresh failed", "grant", grant, "err", err)
		return s.now().Add(5 * time.Second)
	}
}

// loop ticks until ctx ends, then waits for in-flight refreshes.
func (s *scheduler) loop(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		s.tick(ctx)
		select {
		case <-ctx.Done():
			s.wg.Wait()
			return
		case <-t.C:
		}
	}
}
