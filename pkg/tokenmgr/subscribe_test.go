package tokenmgr

import (
	"errors"
	"testing"
	"time"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

// Invariant 7 fallback: with no subscription, a rotation is noticed by the
// version poll.
func testVersionPoll(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Strict)
	rotator := e.manager(Strict, nil)
	worker := e.pollingManager(Strict, func(o *Options) { o.PollInterval = 20 * time.Millisecond })
	e.seed(rotator)
	if _, err := worker.Token(t.Context(), e.grant); err != nil {
		t.Fatal(err)
	}
	if _, err := rotator.Rotate(t.Context(), e.grant); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the poll to pick up version 2", func() bool {
		e := worker.lookup("jira-prod").entry.Load()
		return e != nil && e.v == 2
	})
}

// Invariant 6 for a polling worker: the poll compares the status too, so a
// dead mark that keeps the version (a lost answer) reaches it.
func testPollSeesDeadMark(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Strict)
	worker := e.pollingManager(Strict, func(o *Options) { o.PollInterval = 20 * time.Millisecond })
	e.seed(worker)
	if _, err := worker.Token(t.Context(), e.grant); err != nil {
		t.Fatal(err)
	}
	if ok, err := worker.store.markLost(t.Context(), e.grant, grantKeys("tm", e.grant), 1, e.status(worker).Family, "an answer was lost"); err != nil || !ok {
		t.Fatalf("mark: %v %v", ok, err)
	}
	eventually(t, "the polling worker to fail fast", func() bool {
		_, err := worker.Token(t.Context(), e.grant)
		return errors.Is(err, ErrReauthRequired)
	})
}

// Messages sent while the subscription is down are lost: on resubscribing
// the Manager compares every grant once, so it still learns of the
// rotation and of the dead mark. The periodic poll is an hour away here,
// so only that comparison can deliver them.
func TestSubscriptionKilledRealRedis(t *testing.T) {
	e := newEnv(t, realBackend, tokenmgrtest.Strict)
	worker := e.manager(Strict, func(o *Options) { o.PollInterval = time.Hour })
	other := e.manager(Strict, nil)
	e.seed(other)
	if _, err := worker.Token(t.Context(), e.grant); err != nil {
		t.Fatal(err)
	}
	admin := e.client()
	kill := func() {
		eventually(t, "the worker's subscription", worker.Subscribed)
		if err := admin.Do(t.Context(), "CLIENT", "KILL", "TYPE", "pubsub").Err(); err != nil {
			t.Fatal(err)
		}
	}
	kill()
	if _, err := other.Rotate(t.Context(), e.grant); err != nil { // its message reaches nobody
		t.Fatal(err)
	}
	eventually(t, "the worker to learn of the rotation", func() bool {
		en := worker.lookup(e.grant).entry.Load()
		return en != nil && en.v == 2
	})
	kill()
	if ok, err := other.store.markLost(t.Context(), e.grant, grantKeys("tm", e.grant), 2, e.status(other).Family, "an answer was lost"); err != nil || !ok {
		t.Fatalf("mark: %v %v", ok, err)
	}
	eventually(t, "the worker to learn of the dead mark", func() bool {
		_, err := worker.Token(t.Context(), e.grant)
		return errors.Is(err, ErrReauthRequired)
	})
}
