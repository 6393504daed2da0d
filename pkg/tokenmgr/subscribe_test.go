package tokenmgr

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/tokenmgr/tokenmgr/internal/redisserver"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
	"golang.org/x/oauth2"
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

// Issue 15: a rotation message carries the new record, sealed; subscribers
// install it without reading Redis. A message that does not open, or skips
// a version, or comes from an older writer without a record, makes them
// read instead.
func testAdoptionWithoutRead(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Strict)
	var workerCommands atomic.Int64
	counting := &commandCounter{n: &workerCommands}
	worker := e.manager(Strict, func(o *Options) { o.Redis.AddHook(counting) })
	rotator := e.manager(Strict, nil)
	e.seed(rotator)
	if _, err := worker.Token(t.Context(), e.grant); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the worker's subscription", worker.Subscribed)
	before := workerCommands.Load()
	adoptedBefore := worker.Stats().Adopted
	v2, err := rotator.Rotate(t.Context(), e.grant)
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "the worker to adopt the rotation", func() bool {
		en := worker.lookup(e.grant).entry.Load()
		return en != nil && en.v == v2
	})
	if n := workerCommands.Load() - before; n != 0 {
		t.Errorf("adopting a rotation cost the worker %d Redis commands, want 0", n)
	}
	if n := worker.Stats().Adopted - adoptedBefore; n != 1 {
		t.Errorf("%d adoptions for one rotation, want 1", n)
	}
	// A message whose record does not open: the worker reads.
	v3, err := rotator.Rotate(t.Context(), e.grant)
	if err != nil {
		t.Fatal(err)
	}
	_ = v3
	before = workerCommands.Load()
	if err := publishAs(t, e, worker, e.grant+" 9 m1 {not json"); err != nil {
		t.Fatal(err)
	}
	eventually(t, "a read after an unreadable message", func() bool { return workerCommands.Load() > before })
	// An older writer's message without a record: the worker reads.
	before = workerCommands.Load()
	if err := publishAs(t, e, worker, e.grant+" 99"); err != nil {
		t.Fatal(err)
	}
	eventually(t, "a read after a message without a record", func() bool { return workerCommands.Load() > before })
	tok, err := worker.Token(t.Context(), e.grant)
	if err != nil || !e.idp.AccessTokenValid(tok.AccessToken) {
		t.Errorf("after the fallbacks: %v", err)
	}
}

// publishAs publishes msg where m listens for e.grant's rotations.
func publishAs(t *testing.T, e *env, m *Manager, msg string) error {
	target := m.store.publishTo(e.grant)
	if ch, ok := strings.CutPrefix(target, "s:"); ok {
		return e.client().SPublish(t.Context(), ch, msg).Err()
	}
	return e.client().Publish(t.Context(), strings.TrimPrefix(target, "p:"), msg).Err()
}

// commandCounter counts the commands a client sends.
type commandCounter struct{ n *atomic.Int64 }

func (c *commandCounter) DialHook(next redis.DialHook) redis.DialHook { return next }
func (c *commandCounter) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error { c.n.Add(1); return next(ctx, cmd) }
}
func (c *commandCounter) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error { c.n.Add(int64(len(cmds))); return next(ctx, cmds) }
}

// Issue 15: when every token of a fleet expires at once, one process takes
// the lease; the others find it held in the same read, wait for the
// holder's message and adopt its record: one command each. Those that read
// before the holder took the lease try it once (two more commands), then
// wait likewise: at most 3 on average with all 20 at the same instant (it
// was 4-7 when every waiter polled the record and the lease); cmd/bench
// measures the fleet figure.
func testNoHerd(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Strict)
	const n = 20
	counts := make([]atomic.Int64, n)
	ms := make([]*Manager, n)
	for i := range ms {
		ms[i] = e.manager(Strict, func(o *Options) { o.Redis.AddHook(&commandCounter{n: &counts[i]}) })
	}
	e.seed(ms[0])
	// Once, so that the server has every script cached (a first EVALSHA
	// costs an EVAL too), as a running fleet's has.
	if _, err := ms[0].Rotate(t.Context(), e.grant); err != nil {
		t.Fatal(err)
	}
	mu := ms[0].leases.rs.NewMutex("tm:{warm}:lock")
	if err := mu.Lock(); err != nil {
		t.Fatal(err)
	}
	_, _ = mu.Unlock() // loads redsync's release script
	for _, m := range ms {
		if _, err := m.Token(t.Context(), e.grant); err != nil {
			t.Fatal(err)
		}
		eventually(t, "subscriptions", m.Subscribed)
	}
	e.idp.SetLatency(200 * time.Millisecond) // the holder's call is under way while the others look
	idpBefore := e.idp.Stats()
	e.clock.Advance(time.Hour)
	before := make([]int64, n)
	refreshed := make([]int64, n)
	for i := range counts {
		before[i] = counts[i].Load()
		refreshed[i] = ms[i].Stats().Refreshes
	}
	var wg sync.WaitGroup
	for _, m := range ms {
		wg.Go(func() {
			if _, err := m.Token(t.Context(), e.grant); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	var total int64
	holders := 0
	for i, m := range ms {
		if m.Stats().Refreshes > refreshed[i] {
			holders++
			continue
		}
		total += counts[i].Load() - before[i]
	}
	per := float64(total) / float64(n-holders)
	t.Logf("%d managers, every token expired at once: %.2f Redis commands per waiting manager", n, per)
	if holders != 1 || per > 3 {
		t.Errorf("%d refreshed; %.2f commands per waiting manager, want one refresh and at most 3", holders, per)
	}
	if s := e.idp.Stats(); s.RefreshOK-idpBefore.RefreshOK != 1 || s.ReuseDetected != 0 {
		t.Errorf("IdP %+v", s)
	}
}

// On a Redis 7 Cluster, rotation messages are sharded by default: each
// grant on its own channel in its slot, so a process hears only the grants
// it uses and only the grant's shard carries the message.
func TestShardedMessagesOnCluster(t *testing.T) {
	nodes := redisserver.StartCluster(t, 3, 0)
	addrs := make([]string, len(nodes))
	for i, n := range nodes {
		addrs[i] = n.Addr()
	}
	idp := tokenmgrtest.NewServer(tokenmgrtest.Config{Profile: tokenmgrtest.Strict, AuthStyle: oauth2.AuthStyleInHeader})
	t.Cleanup(idp.Close)
	manager := func() *Manager {
		c := redis.NewClusterClient(&redis.ClusterOptions{Addrs: addrs})
		t.Cleanup(func() { c.Close() })
		m, err := New(t.Context(), Options{Redis: c, OAuth2: idp.OAuthConfig(oauth2.AuthStyleInHeader), Provider: Strict, AllowPlaintext: true, Logger: discardLogger()})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = m.Close(context.Background()) })
		return m
	}
	worker, rotator := manager(), manager()
	if !worker.store.sharded {
		t.Fatal("sharded messages not chosen on a Redis 7 Cluster")
	}
	for _, g := range []string{"a", "b", "c"} {
		if _, err := rotator.Seed(t.Context(), g, idp.NewGrant(""), SeedOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := worker.Token(t.Context(), "a"); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the worker's subscription", worker.Subscribed)
	heard := worker.Stats().RotationMessages
	spublish := func() []int64 {
		out := make([]int64, len(nodes))
		for i, n := range nodes {
			info, _ := n.Info("commandstats")
			for _, line := range strings.Split(info, "\n") {
				if v, ok := strings.CutPrefix(strings.TrimSpace(line), "cmdstat_spublish:calls="); ok {
					out[i], _ = strconv.ParseInt(strings.SplitN(v, ",", 2)[0], 10, 64)
				}
			}
		}
		return out
	}
	before := spublish()
	for _, g := range []string{"b", "c", "a"} {
		if _, err := rotator.Rotate(t.Context(), g); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, "the worker to adopt a's rotation", func() bool {
		e := worker.lookup("a").entry.Load()
		return e != nil && e.v == 2
	})
	if n := worker.Stats().RotationMessages - heard; n != 1 {
		t.Errorf("the worker using only grant a heard %d rotation messages for three grants' rotations, want 1", n)
	}
	after := spublish()
	var nodesUsed int
	for i := range nodes {
		if after[i] > before[i] {
			nodesUsed++
		}
	}
	t.Logf("SPUBLISH calls per node before %v, after %v", before, after)
	// A process using many grants holds one subscription per node, not
	// one per grant. They are loaded at once: grants joining while their
	// node's connection opens were once left unsubscribed.
	many := manager()
	for i := range 30 {
		if _, err := rotator.Seed(t.Context(), "g"+strconv.Itoa(i), idp.NewGrant(""), SeedOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	var loading sync.WaitGroup
	for i := range 30 {
		loading.Go(func() {
			if _, err := many.Token(t.Context(), "g"+strconv.Itoa(i)); err != nil {
				t.Error(err)
			}
		})
	}
	loading.Wait()
	eventually(t, "30 grants' subscriptions", many.Subscribed)
	many.shards.mu.Lock()
	conns := len(many.shards.loops)
	many.shards.mu.Unlock()
	if conns > len(nodes) {
		t.Errorf("30 grants on %d nodes hold %d subscriptions, want at most one per node", len(nodes), conns)
	}
	if _, err := rotator.Rotate(t.Context(), "g7"); err != nil {
		t.Fatal(err)
	}
	eventually(t, "g7's rotation through the shared subscription", func() bool {
		e := many.lookup("g7").entry.Load()
		return e != nil && e.v == 2
	})
	if nodesUsed == 0 || nodesUsed > 3 {
		t.Errorf("SPUBLISH ran on %d nodes for three grants", nodesUsed)
	}
	// An Admin reads whole records without asking about the lease (Check,
	// Rewrap); that read once named an empty lease key, which a Cluster
	// refuses (CROSSSLOT).
	c := redis.NewClusterClient(&redis.ClusterOptions{Addrs: addrs})
	t.Cleanup(func() { c.Close() })
	admin, err := NewAdmin(Options{Redis: c, OAuth2: idp.OAuthConfig(oauth2.AuthStyleInHeader), Provider: Strict, AllowPlaintext: true, Logger: discardLogger()})
	if err != nil {
		t.Fatal(err)
	}
	if st, err := admin.Status(t.Context(), "g7"); err != nil || st.Version != 2 {
		t.Errorf("Admin.Status on a Cluster: %+v, %v", st, err)
	}
	if err := admin.Check(t.Context(), "g7"); err != nil {
		t.Errorf("Admin.Check on a Cluster: %v", err)
	}
}
