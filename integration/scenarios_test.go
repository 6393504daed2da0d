//go:build integration

package integration

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tokenmgr/tokenmgr/internal/redisserver"
)

// Every scenario runs long enough for at least 30 rotations of 2-second
// access tokens, pre-rotated by a refresher (40% of the lifetime ahead).
const runFor = 50 * time.Second

func checkSteady(t *testing.T, name string, f *fleet, s report, idp map[string]int64) {
	t.Helper()
	f.summary(name, s, idp)
	if idp["rotations"] < 30 {
		t.Errorf("%d rotations, want at least 30", idp["rotations"])
	}
	if idp["refresh_ok"] != idp["rotations"] || idp["reuse_detected"] != 0 || idp["families_revoked"] != 0 {
		t.Errorf("IdP refresh calls %d for %d rotations, %d reuse: want one call per rotation and no reuse", idp["refresh_ok"], idp["rotations"], idp["reuse_detected"])
	}
	if s.Failed != 0 || s.OK == 0 {
		t.Errorf("%d failed requests of %d: %v", s.Failed, s.Requests, s.Failures)
	}
}

// 1. Steady state.
func TestSteadyState(t *testing.T) {
	f := newFleet(t, "strict")
	f.refresher()
	s := sum(f.workers(8, runFor))
	idp := f.stats()
	checkSteady(t, "1-steady", f, s, idp)
	if s.OK != idp["api_200"] || s.UnauthorizedSeen != idp["api_401"] {
		t.Errorf("workers: %d ok and %d 401s; IdP: %d 200s and %d 401s", s.OK, s.UnauthorizedSeen, idp["api_200"], idp["api_401"])
	}
}

// 3. The store Redis restarted without persistence: the record comes back
// from a process holding the newest pair, never an older one.
func TestStoreRestartedWithoutPersistence(t *testing.T) {
	f := newFleet(t, "strict")
	f.refresher()
	var maxBefore, after int64
	var wg sync.WaitGroup
	wg.Go(func() {
		time.Sleep(15 * time.Second)
		maxBefore = f.version()
		f.store.Restart()
		deadline := time.Now().Add(10 * time.Second)
		for after = f.version(); after == 0 && time.Now().Before(deadline); after = f.version() {
			time.Sleep(10 * time.Millisecond)
		}
	})
	s := sum(f.workers(8, runFor))
	wg.Wait()
	idp := f.stats()
	checkSteady(t, "3-store-restart", f, s, idp)
	t.Logf("version before the restart %d, restored at %d", maxBefore, after)
	if after == 0 || after < maxBefore {
		t.Errorf("restored version %d, want at least %d (never an older pair)", after, maxBefore)
	}
}

// 5. The store Redis paused for less than a token's lifetime.
func TestStorePaused(t *testing.T) {
	f := newFleet(t, "strict")
	f.refresher()
	var wg sync.WaitGroup
	wg.Go(func() {
		for range 3 {
			time.Sleep(10 * time.Second)
			f.store.Pause()
			time.Sleep(time.Second)
			f.store.Resume()
		}
	})
	s := sum(f.workers(8, runFor))
	wg.Wait()
	checkSteady(t, "5-store-paused", f, s, f.stats())
}

// 8. Bursts of 429 and 5xx: Retry-After honoured, backoff bounded, every
// request succeeds once the provider recovers.
func TestProviderBursts(t *testing.T) {
	f := newFleet(t, "strict")
	f.refresher()
	var wg sync.WaitGroup
	var burst report
	wg.Go(func() {
		// A first fleet runs through the bursts; failures are allowed there
		// once a token expires during a backoff.
		burst = sum(f.workers(8, 20*time.Second))
	})
	time.Sleep(4 * time.Second)
	f.faults("fail_429=3&retry_after=1s")
	time.Sleep(6 * time.Second)
	f.faults("fail_5xx=3")
	wg.Wait()
	mid := f.stats()
	after := sum(f.workers(8, runFor))
	idp := f.stats()
	f.summary("8-bursts(during)", burst, mid)
	f.summary("8-bursts(after)", after, idp)
	if idp["injected_429"] != 3 || idp["injected_5xx"] != 3 {
		t.Errorf("the bursts did not happen: %v", idp)
	}
	if idp["reuse_detected"] != 0 || idp["families_revoked"] != 0 {
		t.Errorf("reuse during the bursts: %v", idp)
	}
	if after.Failed != 0 || idp["rotations"]-mid["rotations"] < 30 {
		t.Errorf("after recovery: %d failed, %d rotations", after.Failed, idp["rotations"]-mid["rotations"])
	}
	if idp["refresh_ok"] != idp["rotations"] {
		t.Errorf("%d successful refreshes for %d rotations", idp["refresh_ok"], idp["rotations"])
	}
}

// 10. Workers started and killed with SIGKILL every 0.7 s during rotations,
// beside a refresher (issue 13 item 6): the survivors see no failure, no
// token is reused, and every provider call is the refresher's, so no worker
// pod dies holding the only copy of a new pair. Five rounds, each a new
// fleet: the kills land at different points of the protocol.
func TestProcessChurn(t *testing.T) {
	for round := 1; round <= 5; round++ {
		t.Run(fmt.Sprintf("round%d", round), func(t *testing.T) { churnRound(t, round) })
	}
}

func churnRound(t *testing.T, round int) {
	f := newFleet(t, "strict")
	port, err := redisserver.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	metrics := "http://127.0.0.1:" + strconv.Itoa(port) + "/metrics"
	f.refresher("--listen", "127.0.0.1:"+strconv.Itoa(port))
	stop := make(chan struct{})
	var churned sync.WaitGroup
	var started int
	churned.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(700 * time.Millisecond):
			}
			args := append([]string{"--api-url", f.idpURL + "/rest/api/3/myself", "--duration", "5s", "--report", "json", "--log-level", "error"}, f.common()...)
			cmd, _ := f.start("demo-worker", args...)
			started++
			churned.Go(func() {
				time.Sleep(time.Duration(300+i%7*300) * time.Millisecond)
				signal(cmd, syscall.SIGKILL)
				_, _ = cmd.Process.Wait()
			})
		}
	})
	s := sum(f.workers(8, churnFor))
	close(stop)
	churned.Wait()
	idp := f.stats()
	byRefresher := scrapeCounter(t, metrics, "tokenmgr_provider_refreshes_total")
	f.summary(fmt.Sprintf("10-churn(round %d)", round), s, idp)
	t.Logf("%d workers started and killed; provider refreshes: %d at the IdP, %d by the refresher", started, idp["refresh_ok"], byRefresher)
	if idp["rotations"] < churnRotations {
		t.Errorf("%d rotations, want at least %d", idp["rotations"], churnRotations)
	}
	if idp["reuse_detected"] != 0 || idp["families_revoked"] != 0 || idp["refresh_ok"] != idp["rotations"] || idp["refresh_failed"] != 0 {
		t.Errorf("IdP %v: want one successful call per rotation and no reuse", idp)
	}
	if s.Failed != 0 || s.OK == 0 {
		t.Errorf("%d failed requests of %d: %v", s.Failed, s.Requests, s.Failures)
	}
	if byRefresher != idp["refresh_ok"] {
		t.Errorf("the refresher made %d of the %d provider calls: workers called the provider while it was alive", byRefresher, idp["refresh_ok"])
	}
}

// A churn round runs for churnFor, long enough for churnRotations
// rotations of 2-second tokens.
const (
	churnFor       = 35 * time.Second
	churnRotations = 20
)

// scrapeCounter sums a counter's samples on a Prometheus endpoint.
func scrapeCounter(t *testing.T, url, name string) int64 {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var total int64
	for _, line := range strings.Split(string(body), "\n") {
		if !strings.HasPrefix(line, name+" ") && !strings.HasPrefix(line, name+"{") {
			continue
		}
		fields := strings.Fields(line)
		v, err := strconv.ParseFloat(fields[len(fields)-1], 64)
		if err != nil {
			t.Fatalf("%s: %q", url, line)
		}
		total += int64(v)
	}
	return total
}

// 6. A provider as slow as the HTTP timeout allows: leases are extended
// during the call and the fenced write never lets two pairs win.
func TestSlowProvider(t *testing.T) {
	f := newFleet(t, "strict", "--latency", "1500ms")
	f.refresher()
	s := sum(f.workers(8, 100*time.Second)) // a rotation takes ~3s here
	checkSteady(t, "6-slow-idp", f, s, f.stats())
}

// 2. kill -9 of the lease holder during the provider call, after the
// provider has spent the refresh token (its answer is delayed). Atlassian:
// the next holder replays the same token inside the leeway; 0 failures.
func TestHolderKilledAtlassian(t *testing.T) {
	f := newFleet(t, "atlassian")
	ref := f.refresher()
	var wg sync.WaitGroup
	var killed bool
	wg.Go(func() {
		time.Sleep(8 * time.Second)
		f.faults("answer_delay=1s")
		killed = killIntentHolder(t, f, ref)
		f.faults("answer_delay=0s")
		f.refresher() // the replacement pod
	})
	s := sum(f.workers(8, runFor+10*time.Second))
	wg.Wait()
	idp := f.stats()
	f.summary("2-kill-holder-atlassian", s, idp)
	if !killed {
		t.Fatal("the refresher was never caught mid-call")
	}
	if idp["reuse_detected"] != 0 || idp["families_revoked"] != 0 || s.Failed != 0 || idp["rotations"] < 30 {
		t.Errorf("after the holder died: %d failed requests, IdP %v", s.Failed, idp)
	}
}

// 2. The same on a strict provider: no leeway, so the next holder does not
// present the token the dead one may have spent (a replay would revoke the
// family, and with it a pair a live holder might still write). The grant
// is marked as needing re-consent within the recovery window, saying why,
// every worker fails fast, and the provider sees no storm afterwards.
func TestHolderKilledStrict(t *testing.T) {
	f := newFleet(t, "strict")
	ref := f.refresher()
	var wg sync.WaitGroup
	var killed bool
	var killedAt time.Time
	wg.Go(func() {
		f.waitRotations(30)
		f.faults("answer_delay=1s")
		killed = killIntentHolder(t, f, ref)
		killedAt = time.Now()
		f.faults("answer_delay=0s")
		f.refresher()
	})
	reps := f.workers(8, runFor+10*time.Second)
	wg.Wait()
	s := sum(reps)
	if !killed {
		t.Fatal("the refresher was never caught mid-call")
	}
	status, _ := f.rdb().HGet(context.Background(), "tm:{"+f.grant+"}:tok", "status").Result()
	reason, _ := f.rdb().HGet(context.Background(), "tm:{"+f.grant+"}:tok", "reason").Result()
	before := f.stats()
	time.Sleep(5 * time.Second)
	after := f.stats()
	f.summary("2-kill-holder-strict", s, after)
	t.Logf("killed at %s; status %s: %s", killedAt.Format(time.TimeOnly), status, reason)
	if status != "reauth_required" || !strings.Contains(reason, "not presented again") {
		t.Errorf("status %q reason %q, want reauth_required without presenting the spent token again", status, reason)
	}
	if after["reuse_detected"] != 0 || after["families_revoked"] != 0 {
		t.Errorf("the spent token was presented again: IdP %v", after)
	}
	if !s.ReauthRequired || s.Failures["reauth_required"] == 0 {
		t.Errorf("workers did not fail fast with the typed error: %v", s.Failures)
	}
	if d := after["refresh_ok"] + after["refresh_failed"] - before["refresh_ok"] - before["refresh_failed"]; d != 0 {
		t.Errorf("%d provider calls after the grant was declared dead", d)
	}
}

// killIntentHolder waits until the refresher pod has written a refresh
// intent (just before its provider call) and kill -9s it.
func killIntentHolder(t *testing.T, f *fleet, ref *exec.Cmd) bool {
	rdb := f.rdb()
	suffix := "-" + strconv.Itoa(ref.Process.Pid)
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(2 * time.Millisecond) {
		h, _ := rdb.HGet(context.Background(), "tm:{"+f.grant+"}:intent", "holder").Result()
		if strings.HasSuffix(h, suffix) {
			time.Sleep(300 * time.Millisecond) // the provider has rotated; its answer waits
			signal(ref, syscall.SIGKILL)
			return true
		}
	}
	return false
}

// 4. Three independent lock masters: one killed, refreshes go on; two
// killed, refreshes pause, workers serve until the token expires and then
// fail with a clear error; the masters return and the fleet recovers.
func TestLockMasters(t *testing.T) {
	f := newFleet(t, "strict")
	m1, m2, m3 := redisserver.Start(t), redisserver.Start(t), redisserver.Start(t)
	locks := []string{"--lock-redis", m1.URL() + "," + m2.URL() + "," + m3.URL()}
	f.refresher(locks...)
	// One master down: nothing visible.
	m1.Kill()
	one := sum(f.workers(8, 20*time.Second, locks...))
	mid := f.stats()
	f.summary("4-one-lock-master-down", one, mid)
	if one.Failed != 0 || mid["rotations"] < 10 || mid["reuse_detected"] != 0 {
		t.Errorf("one master down: %d failed, %d rotations", one.Failed, mid["rotations"])
	}
	// Two down: no lease anywhere. A refresh whose lease was taken while
	// there was a quorum may still finish (fenced); the fake IdP answers at
	// once, so half a second covers it, and leaves the workers some of the
	// token's 2 s to serve before it expires. After that no refresh starts.
	m2.Kill()
	time.Sleep(500 * time.Millisecond)
	quorumLost := f.stats()
	two := sum(f.workers(8, 8*time.Second, locks...))
	paused := f.stats()
	f.summary("4-two-lock-masters-down", two, paused)
	if paused["rotations"] != quorumLost["rotations"] {
		t.Errorf("rotations went on without a lock quorum: %d -> %d", quorumLost["rotations"], paused["rotations"])
	}
	if two.Failed == 0 || two.Failures["store_unavailable"]+two.Failures["transport"] == 0 && len(two.Failures) == 0 {
		t.Errorf("no clear error once the token expired: %v", two.Failures)
	}
	// Back: the fleet recovers.
	m1.Restart()
	m2.Restart()
	back := sum(f.workers(8, 25*time.Second, locks...))
	end := f.stats()
	f.summary("4-lock-masters-back", back, end)
	if back.Failed != 0 && back.OK == 0 || end["rotations"] <= paused["rotations"] {
		t.Errorf("no recovery: %d ok, %d failed, rotations %d -> %d", back.OK, back.Failed, paused["rotations"], end["rotations"])
	}
	if end["reuse_detected"] != 0 || end["refresh_ok"] != end["rotations"] {
		t.Errorf("IdP %v", end)
	}
}

// 7. A consumer outside the fleet rotates the grant (strict): the fleet's
// next refresh presents a spent token, the provider revokes the family,
// the grant is marked within one token lifetime plus a refresh, and then
// nobody calls the provider.
func TestForeignConsumer(t *testing.T) {
	f := newFleet(t, "strict")
	f.refresher()
	var wg sync.WaitGroup
	var rotatedAt time.Time
	var markedAfter time.Duration
	wg.Go(func() {
		f.waitRotations(30)
		if _, err := f.foreignRotation(f.grant); err != nil {
			t.Errorf("foreign rotation: %v", err)
			return
		}
		rotatedAt = time.Now()
		for deadline := rotatedAt.Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
			if st, _ := f.rdb().HGet(context.Background(), "tm:{"+f.grant+"}:tok", "status").Result(); st == "reauth_required" {
				markedAfter = time.Since(rotatedAt)
				return
			}
		}
	})
	reps := f.workers(8, runFor)
	wg.Wait()
	s := sum(reps)
	rdb := f.rdb()
	status, _ := rdb.HGet(context.Background(), "tm:{"+f.grant+"}:tok", "status").Result()
	before := f.stats()
	time.Sleep(5 * time.Second)
	after := f.stats()
	f.summary("7-foreign-consumer", s, after)
	if status != "reauth_required" || !s.ReauthRequired {
		t.Fatalf("status %q, workers saw reauth_required=%v", status, s.ReauthRequired)
	}
	if d := after["refresh_ok"] + after["refresh_failed"] - before["refresh_ok"] - before["refresh_failed"]; d != 0 {
		t.Errorf("%d provider calls after the grant was declared dead", d)
	}
	// The bound: the fleet's next refresh, due at most one token lifetime
	// (2s) after the foreign rotation, plus that refresh and a tick.
	t.Logf("foreign rotation at %s; grant marked for re-consent %s later (bound 3s)", rotatedAt.Format(time.TimeOnly), markedAfter)
	if markedAfter == 0 || markedAfter > 3*time.Second {
		t.Errorf("marked %s after the foreign rotation, want within 3s", markedAfter)
	}
}

// 9. Scenario 1 on a three-master Redis Cluster.
func TestCluster(t *testing.T) {
	nodes := []*redisserver.Server{}
	for range 3 {
		nodes = append(nodes, redisserver.Start(t, "--cluster-enabled", "yes", "--cluster-config-file", "nodes-"+strconv.Itoa(len(nodes))+"-"+strconv.FormatInt(time.Now().UnixNano(), 10)+".conf"))
	}
	args := []string{"--cluster", "create"}
	for _, n := range nodes {
		args = append(args, n.Addr())
	}
	args = append(args, "--cluster-replicas", "0", "--cluster-yes")
	if out, err := exec.Command("redis-cli", args...).CombinedOutput(); err != nil {
		t.Fatalf("redis-cli --cluster create: %v\n%s", err, out)
	}
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		out, _ := exec.Command("redis-cli", "-p", strconv.Itoa(nodes[0].Port()), "cluster", "info").Output()
		if strings.Contains(string(out), "cluster_state:ok") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("cluster not ok: %s", out)
		}
	}
	f := newClusterFleet(t, "strict", nodes)
	f.refresher()
	s := sum(f.workers(8, runFor))
	checkSteady(t, "9-cluster", f, s, f.stats())
}

// 13. LayoutPair rolling out: workers of both layouts at once, and the
// refresher replaced mid-run by one writing the other layout (SIGTERM, as
// a Deployment's rolling update does). Every process reads what the others
// wrote, and the record is seen in both layouts.
func TestMixedLayouts(t *testing.T) {
	f := newFleet(t, "strict")
	old := f.refresher("--layout", "hash")
	var seenHash, seenPair atomic.Bool
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		rdb := f.rdb()
		ctx := context.Background()
		for {
			select {
			case <-done:
				return
			case <-time.After(20 * time.Millisecond):
			}
			if n, err := rdb.HExists(ctx, "tm:{"+f.grant+"}:tok", "access_token").Result(); err == nil && n {
				seenHash.Store(true)
			}
			if n, err := rdb.Exists(ctx, "tm:{"+f.grant+"}:pair").Result(); err == nil && n == 1 {
				seenPair.Store(true)
			}
		}
	})
	wg.Go(func() {
		f.waitRotations(12)
		f.refresher("--layout", "pair")
		signal(old, syscall.SIGTERM)
	})
	reps := f.workersWith(8, runFor, func(i int) []string { return []string{"--layout", []string{"hash", "pair"}[i%2]} })
	close(done)
	wg.Wait()
	checkSteady(t, "13-mixed-layouts", f, sum(reps), f.stats())
	if !seenHash.Load() || !seenPair.Load() {
		t.Errorf("record seen with its tokens in the hash: %v, in the pair key: %v; want both", seenHash.Load(), seenPair.Load())
	}
}
