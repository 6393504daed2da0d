//go:build integration

package integration

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tokenmgr/tokenmgr/internal/redisserver"
)

// failoverFigures is what a failover scenario measured around the fault.
type failoverFigures struct {
	masterV   int64         // the record's version on the master just before it was killed
	promotedV int64         // the version the promoted replica held
	promoted  time.Duration // from the kill until the replica was master
	repaired  time.Duration // from the kill until the store held masterV or newer again
}

// rollBack holds replica back (stopped, its link cut) for two rotations,
// kills master, resumes the replica and calls promote to make it master.
// The promoted replica then holds a record older than the one the fleet has
// seen: its refresh token is spent. It returns what it measured, and an
// error if the replica was not behind (the scenario would prove nothing).
// It runs beside the workers, off the test's goroutine, so it returns
// errors instead of calling t.Fatal.
func (f *fleet) rollBack(master, replica *redisserver.Server, promote func() error) (failoverFigures, error) {
	var fig failoverFigures
	// SIGSTOP alone holds nothing back: the kernel keeps receiving the
	// replication stream into the stopped replica's socket. Closing that
	// link from the master's side while the replica is stopped does.
	replica.Pause()
	c := redis.NewClient(&redis.Options{Addr: master.Addr()})
	err := c.ClientKillByFilter(context.Background(), "TYPE", "replica").Err()
	c.Close()
	if err != nil {
		replica.Resume()
		return fig, fmt.Errorf("cut the replication link: %w", err)
	}
	f.waitRotations(f.stats()["rotations"] + 2)
	if fig.masterV, err = f.versionOn(master); err != nil {
		replica.Resume()
		return fig, err
	}
	master.Kill()
	killed := time.Now()
	replica.Resume()
	if fig.promotedV, err = f.versionOn(replica); err != nil {
		return fig, err
	}
	if fig.promotedV >= fig.masterV {
		return fig, fmt.Errorf("the replica holds version %d, the master had %d: not held back, nothing rolled back", fig.promotedV, fig.masterV)
	}
	if err := promote(); err != nil {
		return fig, err
	}
	for deadline := killed.Add(30 * time.Second); !isMaster(replica); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			return fig, errors.New("the replica was not promoted within 30s")
		}
	}
	fig.promoted = time.Since(killed)
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if v, err := f.versionOn(replica); err == nil && v >= fig.masterV {
			fig.repaired = time.Since(killed)
			return fig, nil
		}
		if time.Now().After(deadline) {
			return fig, fmt.Errorf("the store still holds a version below %d 30s after the failover", fig.masterV)
		}
	}
}

func isMaster(s *redisserver.Server) bool {
	info, _ := s.Info("replication")
	return strings.Contains(info, "role:master")
}

// versionOn reads the grant's version straight from one server. READONLY
// lets it read a Cluster replica; elsewhere it is refused and harmless.
func (f *fleet) versionOn(s *redisserver.Server) (int64, error) {
	ctx := context.Background()
	c := redis.NewClient(&redis.Options{Addr: s.Addr(), MaxRetries: -1})
	defer c.Close()
	conn := c.Conn()
	defer conn.Close()
	_ = conn.ReadOnly(ctx).Err()
	v, err := conn.HGet(ctx, "tm:{"+f.grant+"}:tok", "v").Int64()
	if err != nil {
		return 0, fmt.Errorf("read the version on %s: %w", s.Addr(), err)
	}
	return v, nil
}

// failover runs a failover scenario beside a refresher: 8 workers for 35 s,
// during which rollBack rolls the record back, then 8 new workers for 20 s.
// It asserts what a failover promises: no refresh token presented twice, no
// family revoked, the grant alive, one provider call per rotation, and no
// failed request once the failover completed.
func (f *fleet) failover(name string, master, replica *redisserver.Server, promote func() error) {
	t := f.t
	f.refresher()
	var fig failoverFigures
	var faultErr error
	var wg sync.WaitGroup
	wg.Go(func() {
		f.waitRotations(10)
		fig, faultErr = f.rollBack(master, replica, promote)
	})
	during := sum(f.workers(8, 35*time.Second))
	wg.Wait()
	if faultErr != nil {
		t.Fatal(faultErr)
	}
	f.summary(name+"(during)", during, f.stats())
	after := sum(f.workers(8, 20*time.Second))
	idp := f.stats()
	f.summary(name+"(after)", after, idp)
	t.Logf("%s: master at v%d killed, replica promoted at v%d after %s, store back at v%d or newer after %s",
		name, fig.masterV, fig.promotedV, fig.promoted.Round(time.Millisecond), fig.masterV, fig.repaired.Round(time.Millisecond))
	if idp["reuse_detected"] != 0 || idp["families_revoked"] != 0 {
		t.Errorf("a spent refresh token was presented after the rollback: IdP %v", idp)
	}
	if idp["refresh_ok"] != idp["rotations"] || idp["refresh_failed"] != 0 {
		t.Errorf("IdP refresh calls ok=%d failed=%d for %d rotations", idp["refresh_ok"], idp["refresh_failed"], idp["rotations"])
	}
	if after.Failed != 0 || after.OK == 0 || after.ReauthRequired {
		t.Errorf("after the failover: %d failed of %d (%v)", after.Failed, after.Requests, after.Failures)
	}
	if v := f.version(); v <= fig.masterV {
		t.Errorf("version %d after the run, want past %d (the fleet kept rotating from the newest pair)", v, fig.masterV)
	}
}

// 11. Sentinel failover that rolls the record back (issue 13 item 2): a
// master with one replica and three Sentinels; the replica is paused for
// two rotations, the master is killed, Sentinel promotes the stale replica.
// The fleet restores the newest pair with a fenced write and never presents
// the spent refresh token (strict profile).
func TestSentinelFailover(t *testing.T) {
	master := redisserver.Start(t)
	replica := redisserver.StartReplica(t, master)
	var sentinels []*redisserver.Server
	for range 3 {
		sentinels = append(sentinels, redisserver.StartSentinel(t, "tm", master, 2, time.Second))
	}
	for _, s := range sentinels {
		s.WaitInfo("slaves=1,sentinels=3", 30*time.Second)
	}
	f := &fleet{t: t, grant: "jira", profile: "strict", store: master}
	f.redisURL = "redis+sentinel://" + sentinels[0].Addr() + "?master_name=tm&addr=" + sentinels[1].Addr() + "&addr=" + sentinels[2].Addr()
	f.startIdP(nil)
	f.seed()
	f.failover("11-sentinel-failover", master, replica, func() error { return nil }) // Sentinel promotes on its own
}

// 12. The same on a three-master Cluster with a replica per master: the
// replica of the grant's slot is held back, its master killed, and the
// replica takes over with CLUSTER FAILOVER FORCE.
func TestClusterFailover(t *testing.T) {
	nodes := redisserver.StartCluster(t, 3, 1)
	c := redis.NewClient(&redis.Options{Addr: nodes[0].Addr()})
	slot, err := c.ClusterKeySlot(context.Background(), "tm:{jira}:tok").Result()
	c.Close()
	if err != nil {
		t.Fatal(err)
	}
	master, replica := redisserver.SlotOwner(t, nodes, slot)
	f := &fleet{t: t, grant: "jira", profile: "strict", store: nodes[0]}
	seeds := []string{}
	for _, n := range nodes[1:] {
		seeds = append(seeds, "addr="+n.Addr())
	}
	f.redisURL = "redis+cluster://" + nodes[0].Addr() + "?" + strings.Join(seeds, "&")
	f.startIdP(nil)
	f.seed()
	f.failover("12-cluster-failover", master, replica, func() error {
		c := redis.NewClient(&redis.Options{Addr: replica.Addr()})
		defer c.Close()
		return c.Do(context.Background(), "CLUSTER", "FAILOVER", "FORCE").Err()
	})
}
