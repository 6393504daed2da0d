// Package redisserver starts real redis-server processes on free loopback
// ports for tests, so they can be killed, paused and restarted without
// touching any Redis that already runs on the machine.
package redisserver

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// RequireEnv names the environment variable that turns a missing
// redis-server binary from a skip into a failure. CI sets it, so a
// real-Redis test can never be skipped there unnoticed.
const RequireEnv = "TOKENMGR_REQUIRE_REDIS"

// Server is one redis-server process.
type Server struct {
	t    testing.TB
	bin  string
	dir  string
	port int
	args []string
	// confArgs come before the flags: a config file (and --sentinel) for
	// a Sentinel, which rewrites its file and so needs one.
	confArgs []string
	cmd      *exec.Cmd
}

// Binary returns the redis-server path, skipping (or, with RequireEnv set,
// failing) the test when there is none.
func Binary(t testing.TB) string {
	t.Helper()
	bin := os.Getenv("TOKENMGR_REDIS_SERVER")
	if bin == "" {
		var err error
		if bin, err = exec.LookPath("redis-server"); err != nil {
			if os.Getenv(RequireEnv) != "" {
				t.Fatalf("redis-server not found and %s is set: %v", RequireEnv, err)
			}
			t.Skipf("redis-server not found (install it, or set TOKENMGR_REDIS_SERVER): %v", err)
		}
	}
	return bin
}

// Start runs redis-server on a free port with no persistence, plus args.
// It is killed when the test ends.
func Start(t testing.TB, args ...string) *Server {
	t.Helper()
	s := &Server{t: t, bin: Binary(t), dir: t.TempDir(), args: args}
	var err error
	for range 5 {
		if s.port, err = freePort(); err != nil {
			continue
		}
		if err = s.start(); err == nil {
			break
		}
	}
	if err != nil {
		t.Fatalf("start redis-server: %v", err)
	}
	t.Cleanup(func() { s.Kill() })
	return s
}

// Addr is host:port.
func (s *Server) Addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(s.port)) }

// URL is a redis:// URL for the server.
func (s *Server) URL() string { return "redis://" + s.Addr() }

// Port is the TCP port.
func (s *Server) Port() int { return s.port }

func (s *Server) start() error {
	args := append([]string{"--port", strconv.Itoa(s.port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--dir", s.dir, "--protected-mode", "no"}, s.args...)
	if s.confArgs != nil {
		args = s.confArgs
	}
	cmd := exec.Command(s.bin, args...)
	log, err := os.Create(filepath.Join(s.dir, fmt.Sprintf("redis-%d.log", time.Now().UnixNano())))
	if err != nil {
		return err
	}
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		return err
	}
	s.cmd = cmd
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if ping(s.Addr()) == nil {
			return nil
		}
		if cmd.ProcessState != nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	out, _ := os.ReadFile(log.Name())
	return fmt.Errorf("redis-server on port %d did not answer: %s", s.port, lastLines(string(out), 5))
}

// Kill sends SIGKILL and waits for the process to go.
func (s *Server) Kill() {
	if s.cmd == nil {
		return
	}
	_ = s.cmd.Process.Signal(syscall.SIGCONT)
	_ = s.cmd.Process.Kill()
	_ = s.cmd.Wait()
	s.cmd = nil
}

// Restart kills the server and starts a fresh one, with no data, on the
// same port.
func (s *Server) Restart() {
	s.t.Helper()
	s.Kill()
	var err error
	for range 50 {
		if err = s.start(); err == nil {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	s.t.Fatalf("restart redis-server: %v", err)
}

// Pause stops the process with SIGSTOP; Resume continues it.
func (s *Server) Pause()  { _ = s.cmd.Process.Signal(syscall.SIGSTOP) }
func (s *Server) Resume() { _ = s.cmd.Process.Signal(syscall.SIGCONT) }

// StartReplica runs a redis-server that replicates master, and waits until
// its link to the master is up.
func StartReplica(t testing.TB, master *Server, args ...string) *Server {
	t.Helper()
	r := Start(t, append([]string{"--replicaof", "127.0.0.1", strconv.Itoa(master.port)}, args...)...)
	r.WaitInfo("master_link_status:up", 20*time.Second)
	return r
}

// StartSentinel runs a Sentinel (redis-server --sentinel) that monitors
// master as masterName with the given quorum, marking it down after
// downAfter without an answer.
func StartSentinel(t testing.TB, masterName string, master *Server, quorum int, downAfter time.Duration) *Server {
	t.Helper()
	s := &Server{t: t, bin: Binary(t), dir: t.TempDir()}
	var err error
	for range 5 {
		if s.port, err = freePort(); err != nil {
			continue
		}
		conf := filepath.Join(s.dir, fmt.Sprintf("sentinel-%d.conf", s.port))
		body := fmt.Sprintf("port %d\nbind 127.0.0.1\nprotected-mode no\ndir %s\n"+
			"sentinel monitor %s 127.0.0.1 %d %d\nsentinel down-after-milliseconds %s %d\n"+
			"sentinel failover-timeout %s 10000\nsentinel parallel-syncs %s 1\n",
			s.port, s.dir, masterName, master.port, quorum, masterName, downAfter.Milliseconds(), masterName, masterName)
		if err = os.WriteFile(conf, []byte(body), 0o600); err != nil {
			break
		}
		s.confArgs = []string{conf, "--sentinel"}
		if err = s.start(); err == nil {
			break
		}
	}
	if err != nil {
		t.Fatalf("start redis-server --sentinel: %v", err)
	}
	t.Cleanup(func() { s.Kill() })
	return s
}

// WaitInfo waits until INFO (all sections) contains want.
func (s *Server) WaitInfo(want string, within time.Duration) {
	s.t.Helper()
	deadline := time.Now().Add(within)
	var last string
	for time.Now().Before(deadline) {
		if info, err := s.Info(); err == nil {
			if strings.Contains(info, want) {
				return
			}
			last = info
		}
		time.Sleep(50 * time.Millisecond)
	}
	s.t.Fatalf("redis-server on port %d: no %q in INFO within %s: %s", s.port, want, within, lastLines(last, 40))
}

// Info returns the server's INFO reply: the default sections, or the ones
// named.
func (s *Server) Info(sections ...string) (string, error) {
	return bulk(s.Addr(), strings.Join(append([]string{"INFO"}, sections...), " ")+"\r\n")
}

// FreePort returns a loopback TCP port that was free a moment ago (for
// extra listeners such as --tls-port).
func FreePort() (int, error) { return freePort() }

// maxPort keeps room for a Cluster node's bus port, which is its port plus
// 10000.
const maxPort = 65535 - 10000

func freePort() (int, error) {
	for range 100 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, err
		}
		port := l.Addr().(*net.TCPAddr).Port
		l.Close()
		if port <= maxPort {
			return port, nil
		}
	}
	return 0, fmt.Errorf("no free port at or below %d in 100 tries", maxPort)
}

// ping speaks just enough RESP to ask PING, so this package needs no client.
func ping(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte("PING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if !strings.HasPrefix(line, "+PONG") {
		return fmt.Errorf("unexpected reply %q", line)
	}
	return nil
}

// bulk sends one inline command and reads a bulk-string reply.
func bulk(addr, cmd string) (string, error) {
	c, err := net.DialTimeout("tcp", addr, 500*time.Millisecond)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write([]byte(cmd)); err != nil {
		return "", err
	}
	r := bufio.NewReader(c)
	head, err := r.ReadString('\n')
	if err != nil {
		return "", err
	}
	if !strings.HasPrefix(head, "$") {
		return "", fmt.Errorf("unexpected reply %q", head)
	}
	n, err := strconv.Atoi(strings.TrimSpace(head[1:]))
	if err != nil || n < 0 {
		return "", fmt.Errorf("unexpected reply %q", head)
	}
	buf := make([]byte, n)
	if _, err := io.ReadFull(r, buf); err != nil {
		return "", err
	}
	return string(buf), nil
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
