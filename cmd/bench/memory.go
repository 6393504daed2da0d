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

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

// fig8: MEMORY USAGE of one grant's record (encrypted), on a real
// redis-server, for fake-IdP-sized and JWT-sized access tokens.
func fig8(ctx context.Context, out io.Writer, _ string) error {
	for _, conf := range [][]string{nil, {"--hash-max-listpack-value", "4096"}} {
		name := "default server config (hash-max-listpack-value 64)"
		if conf != nil {
			name = "hash-max-listpack-value 4096"
		}
		fmt.Fprintf(out, "%s:\n\n", name)
		if err := memoryPerGrant(ctx, out, conf); err != nil {
			return err
		}
		fmt.Fprintln(out)
	}
	fmt.Fprintln(out, "51 B is the fake IdP's token size; Atlassian access tokens are JWTs of about 1-2.5 KB.")
	fmt.Fprintln(out)
	return rotationsSetMemory(ctx, out)
}

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

func memoryPerGrant(ctx context.Context, out io.Writer, conf []string) error {
	addr, stop, err := startRedis(conf...)
	if err != nil {
		fmt.Fprintf(out, "skipped: %v\n", err)
		return nil
	}
	defer stop()
	rdb := redis.NewClient(&redis.Options{Addr: addr})
	defer rdb.Close()
	key, _ := tokenmgr.GenerateKey("k1")
	kr, _ := tokenmgr.NewKeyring(key)
	admin, err := tokenmgr.NewAdmin(tokenmgr.Options{Redis: rdb, Sealer: kr, Provider: tokenmgr.Atlassian, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		return err
	}
	fmt.Fprintln(out, "| access token | refresh token | record bytes (MEMORY USAGE) | schedule entry bytes | per grant |")
	fmt.Fprintln(out, "|---|---|---|---|---|")
	for _, sz := range []struct{ at, rt int }{{51, 51}, {1200, 64}, {2400, 64}} {
		const grants = 1000
		before, _ := rdb.MemoryUsage(ctx, "tm:due", 0).Result()
		var rec int64
		for i := range grants {
			g := fmt.Sprintf("grant-%d-%d", sz.at, i)
			tok := &oauth2.Token{AccessToken: strings.Repeat("a", sz.at), RefreshToken: strings.Repeat("r", sz.rt), TokenType: "Bearer", Expiry: time.Now().Add(time.Hour)}
			tok = tok.WithExtra(map[string]any{"scope": "read:jira-work write:jira-work offline_access"})
			if _, err := admin.Seed(ctx, g, tok, tokenmgr.SeedOptions{}); err != nil {
				return err
			}
			n, err := rdb.MemoryUsage(ctx, "tm:{"+g+"}:tok", 0).Result()
			if err != nil {
				return err
			}
			rec += n
		}
		after, _ := rdb.MemoryUsage(ctx, "tm:due", 0).Result()
		due := float64(after-before) / grants
		fmt.Fprintf(out, "| %d B | %d B | %d | %.0f | %.0f B |\n", sz.at, sz.rt, rec/grants, due, float64(rec)/grants+due)
	}
	return nil
}

// startRedis runs a throwaway redis-server on a free loopback port.
func startRedis(extra ...string) (string, func(), error) {
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		return "", nil, fmt.Errorf("redis-server not found")
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, err
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	dir, _ := os.MkdirTemp("", "bench-redis-")
	cmd := exec.Command(bin, append([]string{"--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir}, extra...)...)
	if err := cmd.Start(); err != nil {
		return "", nil, err
	}
	stop := func() { _ = cmd.Process.Kill(); _ = cmd.Wait(); os.RemoveAll(dir) }
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	for range 100 {
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
	return "", nil, fmt.Errorf("redis-server did not start")
}
