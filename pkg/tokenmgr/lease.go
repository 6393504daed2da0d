package tokenmgr

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-redsync/redsync/v4"
	redsyncredis "github.com/go-redsync/redsync/v4/redis"
	"github.com/go-redsync/redsync/v4/redis/goredis/v9"
	"github.com/redis/go-redis/v9"
)

// leases hands out the refresh lease of each grant: a Redlock mutex over
// one or several independent Redis masters (invariant 2, 3). It is the one
// place that knows redsync. The lease saves provider calls; what is stored
// is decided by the fenced write, not by the lease.
type leases struct {
	rs *redsync.Redsync
	// probe is the first lock server, asked whether anyone holds a lease.
	probe redsyncredis.Pool
	ttl   time.Duration // LeaseTTL
	retry time.Duration // LockRetry: pause between attempts on a held lease
	log   *slog.Logger
	stats *counters
}

// newLeases uses Options.LockRedis, or Options.Redis when there are none.
func newLeases(o Options, log *slog.Logger, stats *counters) *leases {
	clients := o.LockRedis
	if len(clients) == 0 {
		clients = []redis.UniversalClient{o.Redis}
	}
	pools := make([]redsyncredis.Pool, len(clients))
	for i, c := range clients {
		pools[i] = goredis.NewPool(c)
	}
	return &leases{rs: redsync.New(pools...), probe: pools[0], ttl: o.LeaseTTL, retry: o.LockRetry, log: log, stats: stats}
}

// lease is one held lease.
type lease struct {
	mu    *redsync.Mutex
	ttl   time.Duration
	grant string
	log   *slog.Logger
	stats *counters
	// kept is set when a held write took the lease over: it stays held
	// until the pair is written (invariant 10), so refresh does not
	// release it.
	kept atomic.Bool
	// opMu serialises the mutex's extensions and release: a redsync Mutex
	// is not safe for concurrent use, and a held write's keepAlive may
	// overlap the provider call's.
	opMu     sync.Mutex
	released bool // guarded by opMu
}

// errLeaseBusy means the lease stayed with another holder (or the lock
// servers refused every attempt) until the caller's context ended.
var errLeaseBusy = errors.New("another process holds the refresh lease")

// acquire takes the lease named key for grant. While another process holds
// it, acquire waits for the grant's next rotation message (wake) or for
// pause, then asks wanted whether the lease is still needed;
// when it is not (someone else rotated), acquire returns nil, nil. When ctx
// ends first it returns errLeaseBusy, or the lock servers' error if they
// failed for another reason.
func (ls *leases) acquire(ctx context.Context, grant, key string, wake func() <-chan struct{}, pause func() time.Duration, wanted func() bool) (*lease, error) {
	mu := ls.rs.NewMutex(key, redsync.WithExpiry(ls.ttl), redsync.WithTries(1))
	for {
		err := mu.TryLockContext(ctx)
		if err == nil {
			ls.stats.leases.Add(1)
			return &lease{mu: mu, ttl: ls.ttl, grant: grant, log: ls.log, stats: ls.stats}, nil
		}
		ls.stats.lockWaits.Add(1)
		var taken *redsync.ErrTaken
		busy := errors.As(err, &taken) || errors.Is(err, redsync.ErrFailed)
		if !busy {
			ls.log.DebugContext(ctx, "lease attempt failed", "grant", grant, "err", err)
		}
		// Another process holds the lease, or the lock servers are down:
		// wait for its rotation message (or a jittered pause), then look.
		changed := wake()
		t := time.NewTimer(pause())
		select {
		case <-changed:
		case <-t.C:
		case <-ctx.Done():
		}
		t.Stop()
		if ctx.Err() != nil {
			if busy {
				return nil, errLeaseBusy
			}
			return nil, err
		}
		if !wanted() {
			return nil, nil
		}
	}
}

// heldByAnyone reports whether the first lock server holds a lease on key:
// a refresh is in flight somewhere.
func (ls *leases) heldByAnyone(ctx context.Context, key string) (bool, error) {
	conn, err := ls.probe.Get(ctx)
	if err != nil {
		return false, err
	}
	defer conn.Close()
	v, err := conn.Get(key)
	return v != "", err
}

// ensure makes sure the lease has at least need left, extending it if not.
// An error means the lease is lost: after a long pause another holder may
// have taken over, and the token must not be spent.
func (l *lease) ensure(ctx context.Context, need time.Duration) error {
	l.opMu.Lock()
	defer l.opMu.Unlock()
	if time.Until(l.mu.Until()) >= need {
		return nil
	}
	if ok, err := l.mu.ExtendContext(ctx); !ok {
		l.stats.leasesLost.Add(1)
		if err == nil {
			err = redsync.ErrExtendFailed
		}
		return err
	}
	return nil
}

// keepAlive extends the lease every third of its TTL until stop is called
// (invariant 3), while what (the provider call, a held answer, a wait for
// one) goes on. stop reports nothing: a lost lease is logged and counted,
// and the fenced write decides what is stored.
func (l *lease) keepAlive(ctx context.Context, what string) (stop func()) {
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		t := time.NewTicker(l.ttl / 3)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				ok, err := l.extend(ctx)
				if !ok {
					l.stats.leasesLost.Add(1)
					l.log.WarnContext(ctx, "refresh lease lost during "+what+"; the fenced write will decide", "grant", l.grant, "err", err)
					return
				}
			}
		}
	}()
	return func() { close(done); <-finished }
}

// extend extends the lease once, within a third of its TTL.
func (l *lease) extend(ctx context.Context) (bool, error) {
	l.opMu.Lock()
	defer l.opMu.Unlock()
	if l.released {
		return true, nil // nothing left to keep alive
	}
	ectx, cancel := context.WithTimeout(context.WithoutCancel(ctx), l.ttl/3)
	defer cancel()
	return l.mu.ExtendContext(ectx)
}

// keep hands the lease over to a held write: refresh's releaseUnlessKept
// leaves it, and the held write releases it once the pair is stored.
func (l *lease) keep() { l.kept.Store(true) }

// releaseUnlessKept releases the lease unless a held write took it over.
func (l *lease) releaseUnlessKept(ctx context.Context) {
	if !l.kept.Load() {
		l.release(ctx)
	}
}

// release gives the lease back, within a second even when ctx has ended.
func (l *lease) release(ctx context.Context) {
	l.opMu.Lock()
	defer l.opMu.Unlock()
	if l.released {
		return
	}
	l.released = true
	uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
	defer cancel()
	_, _ = l.mu.UnlockContext(uctx)
}
