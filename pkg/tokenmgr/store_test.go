package tokenmgr

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
	"weak"

	"github.com/redis/go-redis/v9"
	"github.com/tokenmgr/tokenmgr/internal/redisserver"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

// Invariant 1, at the store: a write fenced on a version that moved on is
// refused, and the version rises by exactly one per rotation.
func testFencedWrite(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Strict)
	m := e.manager(Strict, nil)
	e.seed(m)
	k := grantKeys(m.opts.KeyPrefix, e.grant)
	fam := e.status(m).Family
	a := &record{Family: fam, Status: StatusOK, AccessToken: "A-access", RefreshToken: "A-refresh", TokenType: "Bearer", Expiry: e.clock.Now().Add(time.Hour)}
	bb := &record{Family: fam, Status: StatusOK, AccessToken: "B-access", RefreshToken: "B-refresh", TokenType: "Bearer", Expiry: e.clock.Now().Add(time.Hour)}
	res, v, _, err := m.store.rotate(t.Context(), e.grant, k, 1, a)
	if err != nil || res != casWritten || v != 2 {
		t.Fatalf("first write: %v %d %v, want written at 2", res, v, err)
	}
	res, v, _, err = m.store.rotate(t.Context(), e.grant, k, 1, bb)
	if err != nil || res != casConflict || v != 2 {
		t.Fatalf("stale write: %v %d %v, want a conflict at 2", res, v, err)
	}
	rec, err := m.store.read(t.Context(), e.grant, k)
	if err != nil {
		t.Fatal(err)
	}
	if rec.V != 2 || rec.AccessToken != "A-access" || rec.RefreshCount != 1 {
		t.Errorf("stored v=%d refresh_count=%d, first writer's pair=%v; want 2, 1, true", rec.V, rec.RefreshCount, rec.AccessToken == "A-access")
	}
	if n, _ := m.opts.Redis.Exists(t.Context(), k.intent).Result(); n != 0 {
		t.Errorf("the fenced write left the intent behind")
	}
}

// commandLog records the name of every command a client sends (with the
// subcommand for container commands such as CLIENT).
type commandLog struct {
	mu   sync.Mutex
	seen map[string]bool
}

func (c *commandLog) note(cmd redis.Cmder) {
	name := strings.ToLower(cmd.Name())
	if args := cmd.Args(); (name == "client" || name == "config" || name == "acl") && len(args) > 1 {
		name += "|" + strings.ToLower(fmt.Sprint(args[1]))
	}
	c.mu.Lock()
	c.seen[name] = true
	c.mu.Unlock()
}

func (c *commandLog) DialHook(next redis.DialHook) redis.DialHook { return next }
func (c *commandLog) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error { c.note(cmd); return next(ctx, cmd) }
}
func (c *commandLog) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		for _, cmd := range cmds {
			c.note(cmd)
		}
		return next(ctx, cmds)
	}
}

// scriptCommands lists the commands the Lua scripts call: ACLs check them
// against the calling user too.
func scriptCommands(t *testing.T) []string {
	t.Helper()
	files, err := filepath.Glob("scripts/*.lua")
	if err != nil || len(files) == 0 {
		t.Fatalf("no scripts: %v", err)
	}
	re := regexp.MustCompile(`redis\.p?call\('([A-Za-z]+)'`)
	var out []string
	for _, f := range files {
		src, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range re.FindAllStringSubmatch(string(src), -1) {
			out = append(out, strings.ToLower(m[1]))
		}
	}
	return out
}

// connectionOptional are what go-redis tries on a new connection and
// carries on without when refused (Redis before 7.2 does not know them; the
// README says when to add them).
var connectionOptional = map[string]bool{"client|setinfo": true, "client|maint_notifications": true}

// readmeACL returns the commands the README's ACL SETUSER line for user
// allows, and whether a category covers connection commands.
func readmeACL(t *testing.T, user string) map[string]bool {
	t.Helper()
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(readme), "\n") {
		if !strings.HasPrefix(line, "ACL SETUSER "+user+" ") {
			continue
		}
		allowed := map[string]bool{}
		for _, f := range strings.Fields(line) {
			if !strings.HasPrefix(f, "+") {
				continue
			}
			f = strings.ToLower(strings.TrimPrefix(f, "+"))
			if f == "@connection" {
				for _, c := range []string{"ping", "hello", "auth", "select", "client"} {
					allowed[c] = true
				}
				continue
			}
			allowed[f] = true
			if cmd, _, ok := strings.Cut(f, "|"); ok {
				allowed[cmd+"|*sub"] = true
			}
		}
		return allowed
	}
	t.Fatalf("README has no ACL SETUSER line for %s", user)
	return nil
}

func aclAllows(allowed map[string]bool, cmd string) bool {
	if allowed[cmd] {
		return true
	}
	base, _, sub := strings.Cut(cmd, "|")
	return sub && allowed[base]
}

// Every command the store sends, directly or from a script, on every path a
// worker and a refresher take (rotation, 401 wait, dead mark, backoff,
// restore, poll, status, schedule, rewrap), is one the README's ACL lines
// grant that user: a new command cannot ship without its ACL line.
func TestStoreCommandsAllowedByReadmeACL(t *testing.T) {
	e := newEnv(t, miniredisBackend, tokenmgrtest.Strict)
	roles := map[string]*commandLog{"worker": {seen: map[string]bool{}}, "refresher": {seen: map[string]bool{}}}
	withLog := func(l *commandLog) func(*Options) {
		return func(o *Options) { o.Redis.AddHook(l) }
	}
	worker := e.manager(Strict, withLog(roles["worker"]))
	refresher := e.manager(Strict, withLog(roles["refresher"]))
	ctx := t.Context()

	e.seed(refresher)
	if _, err := worker.Token(ctx, e.grant); err != nil {
		t.Fatal(err)
	}
	for _, m := range []*Manager{worker, refresher} {
		if _, err := m.Rotate(ctx, e.grant); err != nil {
			t.Fatal(err)
		}
		if _, err := m.leases.heldByAnyone(ctx, grantKeys("tm", e.grant).lock); err != nil {
			t.Fatal(err)
		}
		m.pollOnce(nil)
		// Redis loses the record: the newest pair is restored.
		if err := e.client().Del(ctx, grantKeys("tm", e.grant).record).Err(); err != nil {
			t.Fatal(err)
		}
		if _, err := m.read(ctx, m.lookup(e.grant)); err != nil {
			t.Fatal(err)
		}
		// The provider asks to wait: a fleet-wide backoff.
		e.idp.Fail429(1, time.Second)
		e.clock.Advance(2 * time.Hour)
		if _, err := m.Token(ctx, e.grant); err == nil {
			t.Fatal("Token went through a 429")
		}
		e.clock.Advance(time.Minute)
		if _, err := m.Token(ctx, e.grant); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := refresher.RefreshIfDue(ctx, e.grant); err != nil {
		t.Fatal(err)
	}
	if _, errs := refresher.Statuses(ctx, []string{e.grant}); errs[0] != nil {
		t.Fatal(errs[0])
	}
	if _, err := refresher.DueGrants(ctx, e.clock.Now().Add(time.Hour), 10); err != nil {
		t.Fatal(err)
	}
	if _, err := refresher.Grants(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := refresher.DeadGrants(ctx); err != nil {
		t.Fatal(err)
	}
	key, _ := GenerateKey("k1")
	kr, _ := NewKeyring(key)
	rw := &Admin{newCore(Options{Redis: refresher.opts.Redis, KeyPrefix: "tm", Sealer: kr.WithPlaintextReads(), Logger: discardLogger(), Now: e.clock.Now})}
	if _, err := rw.Rewrap(ctx, e.grant); err != nil {
		t.Fatal(err)
	}
	// A refresh token the provider refuses: the grant is marked dead.
	tok := e.idp.NewGrant("")
	tok.RefreshToken = "unknown-to-the-idp"
	if _, err := refresher.Seed(ctx, "dead", tok, SeedOptions{}); err != nil {
		t.Fatal(err)
	}
	e.clock.Advance(2 * time.Hour)
	if _, err := worker.Token(ctx, "dead"); !errors.Is(err, ErrReauthRequired) {
		t.Fatalf("Token of a refused grant = %v, want ErrReauthRequired", err)
	}

	scripts := scriptCommands(t)
	for user, l := range roles {
		allowed := readmeACL(t, user)
		if !l.seen["evalsha"] && !l.seen["eval"] {
			t.Errorf("%s: no script ran; the workload is broken", user)
		}
		l.seen["subscribe"] = true // PubSub commands bypass the hooks
		for _, c := range scripts {
			l.seen[c] = true
		}
		for cmd := range l.seen {
			if connectionOptional[cmd] {
				continue
			}
			if !aclAllows(allowed, cmd) {
				t.Errorf("the %s sends %s, which the README's ACL line for %s does not grant", user, strings.ToUpper(cmd), user)
			}
		}
	}
}

// Options.MinReplicas: the writes that create a version, and the intent
// before a provider call, wait for a replica's acknowledgement; one that
// does not come in time is counted, and the write stands.
func TestMinReplicasRealRedis(t *testing.T) {
	e := newEnv(t, realBackend, tokenmgrtest.Strict)
	replica := redisserver.StartReplica(t, e.srv)
	m := e.manager(Strict, func(o *Options) { o.MinReplicas = 1; o.ReplicaTimeout = 2 * time.Second })
	e.seed(m)
	if _, err := m.Rotate(t.Context(), e.grant); err != nil {
		t.Fatal(err)
	}
	if n := m.Stats().ReplicaAckTimeouts; n != 0 {
		t.Fatalf("%d acknowledgement timeouts with the replica up, want 0", n)
	}
	replica.Pause()
	defer replica.Resume()
	v, err := m.Rotate(t.Context(), e.grant)
	if err != nil || v != 3 {
		t.Fatalf("rotate with the replica paused: %d %v, want version 3", v, err)
	}
	if n := m.Stats().ReplicaAckTimeouts; n != 2 {
		t.Errorf("%d acknowledgement timeouts with the replica paused, want 2 (the intent, then the rotation)", n)
	}
	if st := e.status(m); st.Version != 3 {
		t.Errorf("stored version %d, want 3: the write stands", st.Version)
	}
}

// After a Cluster failover the store reaches the promoted replica within
// seconds: a failed command reloads the slot map (reloadOnFailure). Without
// that, go-redis sends the slot to the dead master until its periodic reload
// (60 s by default), longer than a token lives.
func TestClusterFailoverReachedAtOnce(t *testing.T) {
	nodes := redisserver.StartCluster(t, 3, 1)
	addrs := make([]string, len(nodes))
	for i, n := range nodes {
		addrs[i] = n.Addr()
	}
	cc := redis.NewClusterClient(&redis.ClusterOptions{Addrs: addrs, MaxRetries: 1, DialTimeout: 200 * time.Millisecond})
	t.Cleanup(func() { cc.Close() })
	s := newStore(cc, "tm", plaintext{})
	newStore(cc, "tm", plaintext{}) // a second Manager on the client: hooked once
	hooks := 0
	reloadHooked.Range(func(k, _ any) bool {
		if k.(weak.Pointer[redis.ClusterClient]).Value() == cc {
			hooks++
		}
		return true
	})
	if hooks != 1 {
		t.Errorf("the client is hooked %d times, want once", hooks)
	}
	k := grantKeys("tm", "jira")
	ctx := t.Context()
	slot, err := cc.ClusterKeySlot(ctx, k.record).Result()
	if err != nil {
		t.Fatal(err)
	}
	master, replica := redisserver.SlotOwner(t, nodes, slot)
	replica.WaitInfo("master_link_status:up", 10*time.Second)
	// Written on one connection to the master, and WAITed for there: a
	// replica that had not received the write (replication is
	// asynchronous; a loaded machine lags) would be promoted without it.
	mc := redis.NewClient(&redis.Options{Addr: master.Addr(), PoolSize: 1})
	t.Cleanup(func() { mc.Close() })
	if err := mc.HSet(ctx, k.record, "v", "1", "status", StatusOK).Err(); err != nil {
		t.Fatal(err)
	}
	if n, err := mc.Wait(ctx, 1, 10*time.Second).Result(); err != nil || n < 1 {
		t.Fatalf("the replica did not acknowledge the record: %d %v", n, err)
	}
	if h := s.readHeads(ctx, []string{"jira"})[0]; h.failed || h.v != 1 {
		t.Fatalf("read before the failover: %+v", h)
	}
	master.Kill()
	rc := redis.NewClient(&redis.Options{Addr: replica.Addr()})
	t.Cleanup(func() { rc.Close() })
	if err := rc.Do(ctx, "CLUSTER", "FAILOVER", "FORCE").Err(); err != nil {
		t.Fatal(err)
	}
	// The promotion needs the other masters' votes; a loaded machine (the
	// race run) has been seen to need more than 10 s.
	replica.WaitInfo("role:master", 30*time.Second)
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := s.read(ctx, "jira", k)
		var corrupt *CorruptRecordError
		if err == nil || errors.As(err, &corrupt) { // reached the record
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the store still fails 10s after the failover: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestTopologySuspect(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{nil, false},
		{redis.Nil, false},
		{context.Canceled, false},
		{fmt.Errorf("read: %w", context.DeadlineExceeded), true},
		{errors.New("dial tcp 127.0.0.1:1: connect: connection refused"), true},
		{redis.ErrClosed, true},
		{proto("CLUSTERDOWN The cluster is down"), true},
		{proto("TRYAGAIN Multiple keys request during rehashing of slot"), true},
		{proto("MASTERDOWN Link with MASTER is down"), true},
		{proto("NOPERM this user has no permissions to run the 'eval' command"), false},
		{proto("ERR Error running script"), false},
	} {
		if got := topologySuspect(tc.err); got != tc.want {
			t.Errorf("topologySuspect(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

// proto is a reply error as go-redis returns it.
func proto(msg string) error { return redisReplyError(msg) }

type redisReplyError string

func (e redisReplyError) Error() string { return string(e) }
func (redisReplyError) RedisError()     {}
