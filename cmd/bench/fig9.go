package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"golang.org/x/oauth2"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

// Figure 9's fleet: managers processes, each using its own perManager
// grants, and rotations rotations of those grants (each grant held by
// exactly one manager) by a separate rotator.
const (
	fig9Managers   = 100
	fig9PerManager = 10
	fig9Batches    = 5
	fig9Batch      = 200
	fig9Rotations  = fig9Batches * fig9Batch // every grant in use, once
	fig9Flat       = 1.25                    // "flat": at most this ratio from 1k to 10k grants
)

// clusterRow is one measurement of figure 9.
type clusterRow struct {
	grants   int
	mode     tokenmgr.Messages
	messages int64 // rotation messages the managers received (Stats.RotationMessages)
	// unsubscribed counts the managers whose rotation messages were not
	// all subscribed 5 s after they loaded their grants (Subscribed).
	unsubscribed int
	batches      []batch
	idle         float64 // CPU seconds per second of the 3 nodes, idle with every manager running
	publish      []int64 // PUBLISH calls per node during the rotations
	spublish     []int64 // SPUBLISH calls per node
}

// batch is one batch of fig9Batch rotations: the CPU seconds the 3 nodes
// spent from its first rotation until its messages had arrived, and how
// long that took.
type batch struct {
	cpu    float64
	window time.Duration
}

func (r clusterRow) perManager() float64 {
	return float64(r.messages) / (fig9Managers * fig9Rotations)
}

// cpuPerRotation is the nodes' CPU per rotation, net of what they spend
// idle in the same time: the median of the batches.
func (r clusterRow) cpuPerRotation() time.Duration {
	return r.median(func(b batch) float64 { return b.cpu - r.idle*b.window.Seconds() })
}

// rawPerRotation is cpuPerRotation with the idle CPU left in.
func (r clusterRow) rawPerRotation() time.Duration {
	return r.median(func(b batch) float64 { return b.cpu })
}

func (r clusterRow) median(cpu func(batch) float64) time.Duration {
	per := make([]time.Duration, len(r.batches))
	for i, b := range r.batches {
		per[i] = time.Duration(cpu(b) / fig9Batch * float64(time.Second))
	}
	sortDurations(per)
	return per[len(per)/2]
}

func modeName(m tokenmgr.Messages) string {
	if m == tokenmgr.MessagesSharded {
		return "sharded (`MessagesSharded`)"
	}
	return "global channel (`MessagesGlobal`)"
}

// fig9: on a 3-master Redis Cluster holding 1k, then 10k grants, 100
// Managers (each its own ClusterClient) each use their own 10 grants; a
// rotator rotates 200 of them. Rotation messages on the global channel,
// then sharded, in the same run.
func fig9(ctx context.Context, out io.Writer, _ env) (verdict, error) {
	addrs, stop, err := startCluster(ctx, 3)
	if err != nil {
		fmt.Fprintf(out, "skipped: %v\n", err)
		return verdict{skipped: true, result: "skipped: " + err.Error()}, nil
	}
	defer stop()
	idp := tokenmgrtest.NewServer(tokenmgrtest.Config{Profile: tokenmgrtest.Strict, AuthStyle: oauth2.AuthStyleInParams, AccessTTL: time.Hour})
	defer idp.Close()
	nodes := make([]*redis.Client, len(addrs))
	for i, a := range addrs {
		nodes[i] = redis.NewClient(&redis.Options{Addr: a})
		defer nodes[i].Close()
	}
	seedClient := redis.NewClusterClient(&redis.ClusterOptions{Addrs: addrs})
	defer seedClient.Close()
	admin, err := tokenmgr.NewAdmin(tokenmgr.Options{Redis: seedClient, Provider: tokenmgr.Strict, AllowPlaintext: true, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		return verdict{}, err
	}
	var rows []clusterRow
	seeded := 0
	for _, n := range []int{1000, 10_000} {
		if err := seedGrants(ctx, admin, idp, seeded, n); err != nil {
			return verdict{}, err
		}
		seeded = n
		for _, mode := range []tokenmgr.Messages{tokenmgr.MessagesGlobal, tokenmgr.MessagesSharded} {
			r, err := clusterRotations(ctx, addrs, nodes, idp, n, mode)
			if err != nil {
				return verdict{}, fmt.Errorf("%d grants, %s: %w", n, modeName(mode), err)
			}
			rows = append(rows, r)
		}
	}
	fmt.Fprintf(out, "3 masters, no replicas, on redis-server; %d Managers, each with its own `*redis.ClusterClient` and its own %d grants (loaded with `Token()`, which subscribes to their rotations); a separate rotator Manager rotates each of those %d grants once (each is held by exactly one manager), in %d batches of %d.\n\n", fig9Managers, fig9PerManager, fig9Rotations, fig9Batches, fig9Batch)
	fmt.Fprintln(out, "| grants | rotation messages on | managers not subscribed after 5 s | rotation messages received by the managers | per manager per rotation | Redis CPU per rotation, net of idle | raw | idle CPU of the 3 nodes | PUBLISH calls per node | SPUBLISH calls per node |")
	fmt.Fprintln(out, "|---|---|---|---|---|---|---|---|---|---|")
	for _, r := range rows {
		fmt.Fprintf(out, "| %d | %s | %d | %d | %.4f | %s | %s | %.1f ms/s | %s | %s |\n", r.grants, modeName(r.mode), r.unsubscribed, r.messages, r.perManager(),
			r.cpuPerRotation().Round(time.Microsecond), r.rawPerRotation().Round(time.Microsecond),
			1000*r.idle, joinInt64s(r.publish), joinInt64s(r.spublish))
	}
	fmt.Fprintf(out, "\nRedis CPU: the change of `used_cpu_sys + used_cpu_user` (`INFO cpu`) summed over the 3 nodes while a batch of %d rotations ran and its messages arrived, less the nodes' idle rate (measured for 1 s just before, every manager running: health PINGs, polls of unsubscribed grants, cluster bus) times that window, per rotation: the median of the %d batches. It includes the rotator's own reads, lease, intent and fenced write. PUBLISH and SPUBLISH calls are `INFO commandstats` deltas (calls from scripts included). With each grant held by one of the %d managers, hearing only its own grants' rotations is %.4f messages per manager per rotation.\n",
		fig9Batch, fig9Batches, fig9Managers, 1.0/fig9Managers)
	return fig9Verdict(rows), nil
}

func fig9Verdict(rows []clusterRow) verdict {
	find := func(n int, m tokenmgr.Messages) clusterRow {
		for _, r := range rows {
			if r.grants == n && r.mode == m {
				return r
			}
		}
		return clusterRow{}
	}
	s1, s10 := find(1000, tokenmgr.MessagesSharded), find(10_000, tokenmgr.MessagesSharded)
	g1, g10 := find(1000, tokenmgr.MessagesGlobal), find(10_000, tokenmgr.MessagesGlobal)
	onlyOwn := s1.messages == fig9Rotations && s10.messages == fig9Rotations
	growth := float64(s10.cpuPerRotation()) / float64(s1.cpuPerRotation())
	flat := s1.cpuPerRotation() > 0 && growth <= fig9Flat
	v := verdict{met: onlyOwn && flat, result: fmt.Sprintf(
		"sharded %.4f messages per manager per rotation at 10k grants (global %.2f); Redis CPU per rotation sharded %s at 1k and %s at 10k grants (%.2fx), global %s and %s",
		s10.perManager(), g10.perManager(), us(s1.cpuPerRotation()), us(s10.cpuPerRotation()), growth, us(g1.cpuPerRotation()), us(g10.cpuPerRotation()))}
	if n := s1.unsubscribed + s10.unsubscribed; n > 0 {
		v.result += fmt.Sprintf("; %d and %d of the %d sharded managers had a grant not subscribed", s1.unsubscribed, s10.unsubscribed, fig9Managers)
	}
	var why []string
	if !onlyOwn {
		w := fmt.Sprintf("the sharded managers received %d and %d rotation messages at 1k and 10k grants for %d rotations of grants each held by one of them (exactly %d is only their own)",
			s1.messages, s10.messages, fig9Rotations, fig9Rotations)
		if s1.unsubscribed+s10.unsubscribed > 0 {
			w += fmt.Sprintf(": %d and %d of the %d managers still had a grant without a confirmed sharded subscription 5 s after loading their grants (`Subscribed()` false), so they did not hear its rotations and poll it every second instead",
				s1.unsubscribed, s10.unsubscribed, fig9Managers)
		}
		why = append(why, w)
	}
	if !flat {
		why = append(why, fmt.Sprintf("sharded Redis CPU per rotation went from %s at 1k to %s at 10k grants (%.2fx, more than %.2fx), with the nodes idling at %.1f and %.1f ms/s",
			us(s1.cpuPerRotation()), us(s10.cpuPerRotation()), growth, fig9Flat, 1000*s1.idle, 1000*s10.idle))
	}
	if len(why) > 0 {
		v.why = strings.ToUpper(why[0][:1]) + why[0][1:]
		if len(why) > 1 {
			v.why += ", and " + why[1]
		}
		v.why += "."
	}
	return v
}

func us(d time.Duration) string {
	return fmt.Sprintf("%d µs", d.Round(time.Microsecond).Microseconds())
}

func joinInt64s(ns []int64) string {
	s := make([]string, len(ns))
	for i, n := range ns {
		s[i] = fmt.Sprint(n)
	}
	return strings.Join(s, " / ")
}

func grantName(i int) string { return fmt.Sprintf("grant-%05d", i) }

// seedGrants seeds grants from..to-1 from new families at the IdP.
func seedGrants(ctx context.Context, admin *tokenmgr.Admin, idp *tokenmgrtest.Server, from, to int) error {
	var next atomic.Int64
	next.Store(int64(from))
	var wg sync.WaitGroup
	var mu sync.Mutex
	var first error
	for range 16 {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= to {
					return
				}
				if _, err := admin.Seed(ctx, grantName(i), idp.NewGrant(""), tokenmgr.SeedOptions{}); err != nil {
					mu.Lock()
					first = errors.Join(first, err)
					mu.Unlock()
					return
				}
			}
		})
	}
	wg.Wait()
	return first
}

// clusterRotations measures one row of figure 9.
func clusterRotations(ctx context.Context, addrs []string, nodes []*redis.Client, idp *tokenmgrtest.Server, grants int, mode tokenmgr.Messages) (clusterRow, error) {
	row := clusterRow{grants: grants, mode: mode}
	var mu sync.Mutex
	var closers []func()
	defer func() {
		var wg sync.WaitGroup
		for _, c := range closers {
			wg.Go(c)
		}
		wg.Wait()
	}()
	newManager := func() (*tokenmgr.Manager, error) {
		c := redis.NewClusterClient(&redis.ClusterOptions{Addrs: addrs})
		m, err := tokenmgr.New(ctx, tokenmgr.Options{
			Redis: c, OAuth2: idp.OAuthConfig(oauth2.AuthStyleInParams), Provider: tokenmgr.Strict,
			Messages: mode, AllowPlaintext: true, Logger: slog.New(slog.DiscardHandler),
		})
		if err != nil {
			c.Close()
			return nil, err
		}
		mu.Lock()
		closers = append(closers, func() { _ = m.Close(context.Background()); c.Close() })
		mu.Unlock()
		return m, nil
	}
	// Manager i uses grants spread over all of them: with 10k grants, 9
	// in 10 are used by nobody.
	stride := grants / (fig9Managers * fig9PerManager)
	grantOf := func(i, j int) string { return grantName((i*fig9PerManager + j) * stride) }
	ms := make([]*tokenmgr.Manager, fig9Managers)
	for i := range ms {
		m, err := newManager()
		if err != nil {
			return row, err
		}
		ms[i] = m
	}
	var wg sync.WaitGroup
	var failed atomic.Int64
	for i, m := range ms {
		wg.Go(func() {
			for j := range fig9PerManager {
				if _, err := m.Token(ctx, grantOf(i, j)); err != nil {
					failed.Add(1)
				}
			}
		})
	}
	wg.Wait()
	if n := failed.Load(); n > 0 {
		return row, fmt.Errorf("%d Token() calls failed", n)
	}
	rotator, err := newManager()
	if err != nil {
		return row, err
	}
	rotated := make([]string, fig9Rotations)
	for k := range rotated {
		rotated[k] = grantOf(k%fig9Managers, (k/fig9Managers)%fig9PerManager)
		// The rotator loads (and subscribes to) its grants before the
		// measurement, as a refresher that has run a while has.
		if _, err := rotator.Token(ctx, rotated[k]); err != nil {
			return row, err
		}
	}
	// Every subscription should come up within moments; one that has not
	// in 5 s is not coming (it shows in the table: its grants are polled,
	// and their messages are not heard).
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		row.unsubscribed = 0
		for _, m := range ms {
			if !m.Subscribed() {
				row.unsubscribed++
			}
		}
		if row.unsubscribed == 0 && rotator.Subscribed() {
			break
		}
	}
	readAll := func() ([]nodeStats, error) {
		all := make([]nodeStats, len(nodes))
		for i, n := range nodes {
			s, err := readNodeStats(ctx, n)
			if err != nil {
				return nil, err
			}
			all[i] = s
		}
		return all, nil
	}
	cpu := func(s []nodeStats) float64 {
		t := 0.0
		for _, n := range s {
			t += n.cpu
		}
		return t
	}
	heard := func() int64 {
		var t int64
		for _, m := range ms {
			t += m.Stats().RotationMessages
		}
		return t
	}

	idle0, err := readAll()
	if err != nil {
		return row, err
	}
	i0 := time.Now()
	time.Sleep(time.Second)
	idle1, err := readAll()
	if err != nil {
		return row, err
	}
	row.idle = (cpu(idle1) - cpu(idle0)) / time.Since(i0).Seconds()

	want := int64(fig9Batch) // sharded: only the one manager holding the grant
	if mode == tokenmgr.MessagesGlobal {
		want = fig9Batch * fig9Managers
	}
	first, err := readAll()
	if err != nil {
		return row, err
	}
	s1 := first
	for k := range fig9Batches {
		before := heard()
		s0 := s1
		t0 := time.Now()
		for _, g := range rotated[k*fig9Batch : (k+1)*fig9Batch] {
			if _, err := rotator.Rotate(ctx, g); err != nil {
				return row, err
			}
		}
		// Until every message expected has arrived, or none has for
		// 500 ms (a shortfall shows in the table).
		last, lastAt := heard(), time.Now()
		for heard()-before < want && time.Since(lastAt) < 500*time.Millisecond {
			time.Sleep(2 * time.Millisecond)
			if n := heard(); n != last {
				last, lastAt = n, time.Now()
			}
		}
		if s1, err = readAll(); err != nil {
			return row, err
		}
		row.batches = append(row.batches, batch{cpu: cpu(s1) - cpu(s0), window: time.Since(t0)})
		row.messages += heard() - before
	}
	s0 := first
	for i := range nodes {
		row.publish = append(row.publish, s1[i].publish-s0[i].publish)
		row.spublish = append(row.spublish, s1[i].spublish-s0[i].spublish)
	}
	return row, nil
}
