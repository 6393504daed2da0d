package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
	"golang.org/x/oauth2"

	"github.com/tokenmgr/tokenmgr/internal/redisserver"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

// fig8: MEMORY USAGE of one grant's record (encrypted), on a real
// redis-server, for fake-IdP-sized and JWT-sized access tokens.
func fig8(ctx context.Context, out io.Writer, _ env) (verdict, error) {
	var byConf [2][]memRow
	for i, conf := range [][]string{nil, {"--hash-max-listpack-value", "4096"}} {
		name := "default server config (hash-max-listpack-value 64)"
		if conf != nil {
			name = "hash-max-listpack-value 4096"
		}
		fmt.Fprintf(out, "%s:\n\n", name)
		rows, err := memoryPerGrant(ctx, out, conf)
		if err != nil {
			return verdict{}, err
		}
		if rows == nil {
			return verdict{skipped: true, result: "skipped: no redis-server"}, nil
		}
		byConf[i] = rows
		fmt.Fprintln(out)
	}
	fmt.Fprintln(out, "51 B is the fake IdP's token size; Atlassian access tokens are JWTs of about 1-2.5 KB. Beyond the token bytes: the per-grant bytes less the raw access and refresh token bytes.")
	fmt.Fprintln(out)
	if err := rotationsSetMemory(ctx, out); err != nil {
		return verdict{}, err
	}
	v := verdict{met: true}
	var parts []string
	for _, r := range byConf[0] {
		parts = append(parts, fmt.Sprintf("%.0f B with %d B tokens", r.beyond(), r.at))
		if r.beyond() > 300 {
			v.met = false
		}
	}
	v.result = "beyond the raw token bytes, default config: " + strings.Join(parts, ", ") + fmt.Sprintf("; with `hash-max-listpack-value 4096` %.0f B for 51 B tokens", byConf[1][0].beyond())
	if !v.met {
		d, l := byConf[0][0], byConf[1][0]
		v.why = fmt.Sprintf("With the default hash-max-listpack-value 64 the sealed token fields (%d and %d B for %d B tokens) are too long for a listpack, so the record is a %s: %.0f B beyond the token bytes, of which %d B are the encryption's expansion and %.0f B the schedule entry; with hash-max-listpack-value 4096 (a %s) it is %.0f B.",
			d.sealedAT, d.sealedRT, d.at, d.encoding, d.beyond(), d.sealedAT+d.sealedRT-int64(d.at+d.rt), d.due, l.encoding, l.beyond())
	}
	return v, nil
}

// memRow is one token size's cost per grant.
type memRow struct {
	at, rt             int     // raw token bytes
	rec                int64   // MEMORY USAGE of the record
	due                float64 // what its schedule entry adds to tm:due
	encoding           string  // OBJECT ENCODING of the record
	sealedAT, sealedRT int64   // HSTRLEN of the sealed token fields
}

func (r memRow) beyond() float64 { return float64(r.rec) + r.due - float64(r.at+r.rt) }

// rotationsSetMemory measures what a grant rotated in the last hour adds:
// its rotations set (the dashboard's "refreshes in the last hour"), after
// real rotations through a Manager.
func rotationsSetMemory(ctx context.Context, out io.Writer) error {
	w, err := newRealWorld(tokenmgrtest.Atlassian, time.Hour)
	if err != nil {
		fmt.Fprintf(out, "rotations set: skipped: %v\n", err)
		return nil
	}
	defer w.close()
	m, err := w.seeded(ctx, false, tokenmgr.Atlassian, nil)
	if err != nil {
		return err
	}
	rdb := w.client(false)
	fmt.Fprintln(out, "A grant rotated within the last hour also holds `tm:{GRANT}:rotations` (gone an hour after its last rotation):")
	fmt.Fprintln(out)
	fmt.Fprintln(out, "| rotations in the last hour | rotations set bytes (MEMORY USAGE) |")
	fmt.Fprintln(out, "|---|---|")
	done := 0
	for _, n := range []int{1, 2, 12} {
		for ; done < n; done++ {
			if _, err := m.Rotate(ctx, "g"); err != nil {
				return err
			}
			w.clock.Advance(time.Minute)
		}
		b, err := rdb.MemoryUsage(ctx, "tm:{g}:rotations", 0).Result()
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "| %d | %d |\n", n, b)
	}
	return nil
}

func memoryPerGrant(ctx context.Context, out io.Writer, conf []string) ([]memRow, error) {
	addr, stop, err := startRedis(conf...)
	if err != nil {
		fmt.Fprintf(out, "skipped: %v\n", err)
		return nil, nil
	}
	defer stop()
	rdb := redis.NewClient(&redis.Options{Addr: addr})
	defer rdb.Close()
	key, _ := tokenmgr.GenerateKey("k1")
	kr, _ := tokenmgr.NewKeyring(key)
	admin, err := tokenmgr.NewAdmin(tokenmgr.Options{Redis: rdb, Sealer: kr, Provider: tokenmgr.Atlassian, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		return nil, err
	}
	fmt.Fprintln(out, "| access token | refresh token | record bytes (MEMORY USAGE) | encoding | sealed access + refresh token | schedule entry bytes | per grant | beyond the token bytes |")
	fmt.Fprintln(out, "|---|---|---|---|---|---|---|---|")
	var rows []memRow
	for _, sz := range []struct{ at, rt int }{{51, 51}, {1200, 64}, {2400, 64}} {
		const grants = 1000
		before, _ := rdb.MemoryUsage(ctx, "tm:due", 0).Result()
		var rec int64
		var last string
		for i := range grants {
			g := fmt.Sprintf("grant-%d-%d", sz.at, i)
			tok := &oauth2.Token{AccessToken: strings.Repeat("a", sz.at), RefreshToken: strings.Repeat("r", sz.rt), TokenType: "Bearer", Expiry: time.Now().Add(time.Hour)}
			tok = tok.WithExtra(map[string]any{"scope": "read:jira-work write:jira-work offline_access"})
			if _, err := admin.Seed(ctx, g, tok, tokenmgr.SeedOptions{}); err != nil {
				return nil, err
			}
			last = "tm:{" + g + "}:tok"
			n, err := rdb.MemoryUsage(ctx, last, 0).Result()
			if err != nil {
				return nil, err
			}
			rec += n
		}
		after, _ := rdb.MemoryUsage(ctx, "tm:due", 0).Result()
		r := memRow{at: sz.at, rt: sz.rt, rec: rec / grants, due: float64(after-before) / grants}
		r.encoding, _ = rdb.ObjectEncoding(ctx, last).Result()
		r.sealedAT, _ = rdb.HStrLen(ctx, last, "access_token").Result()
		r.sealedRT, _ = rdb.HStrLen(ctx, last, "refresh_token").Result()
		fmt.Fprintf(out, "| %d B | %d B | %d | %s | %d B | %.0f | %.0f B | %.0f B |\n", sz.at, sz.rt, r.rec, r.encoding, r.sealedAT+r.sealedRT, r.due, float64(r.rec)+r.due, r.beyond())
		rows = append(rows, r)
	}
	return rows, nil
}

// startRedis runs a throwaway redis-server on a free loopback port (one
// that leaves room for a Cluster node's bus, port+10000).
func startRedis(extra ...string) (string, func(), error) {
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		return "", nil, fmt.Errorf("redis-server not found")
	}
	for range 5 { // a free port may be taken before the server binds it
		port, err := redisserver.FreePort() // leaves room for the Cluster bus
		if err != nil {
			return "", nil, err
		}
		if addr, stop, err := startRedisOn(bin, port, extra); err == nil {
			return addr, stop, nil
		}
	}
	return "", nil, fmt.Errorf("redis-server did not start")
}

func startRedisOn(bin string, port int, extra []string) (string, func(), error) {
	dir, err := os.MkdirTemp("", "bench-redis-")
	if err != nil {
		return "", nil, err
	}
	cmd := exec.Command(bin, append([]string{"--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir}, extra...)...)
	if err := cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return "", nil, err
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	stop := func() { _ = cmd.Process.Kill(); <-exited; os.RemoveAll(dir) }
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	for range 100 {
		select {
		case <-exited:
			os.RemoveAll(dir)
			return "", nil, fmt.Errorf("redis-server on port %d exited", port)
		default:
		}
		if c, err := net.DialTimeout("tcp", addr, 100*time.Millisecond); err == nil {
			fmt.Fprint(c, "PING\r\n")
			line, _ := bufio.NewReader(c).ReadString('\n')
			c.Close()
			if strings.HasPrefix(line, "+PONG") {
				return addr, stop, nil
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	stop()
	return "", nil, fmt.Errorf("redis-server on port %d did not answer", port)
}
