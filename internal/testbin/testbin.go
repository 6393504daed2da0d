// Package testbin builds the project's commands for tests that run them
// as real processes, and starts the fake IdP binary.
package testbin

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// Build compiles the named commands (directories under cmd/) into a new
// temporary directory and returns it.
func Build(cmds ...string) (string, error) {
	dir, err := os.MkdirTemp("", "tokenmgr-bin-")
	if err != nil {
		return "", err
	}
	for _, cmd := range cmds {
		out, err := exec.Command("go", "build", "-o", filepath.Join(dir, cmd), "github.com/tokenmgr/tokenmgr/cmd/"+cmd).CombinedOutput()
		if err != nil {
			return "", fmt.Errorf("build %s: %v\n%s", cmd, err, out)
		}
	}
	return dir, nil
}

// StartFakeIdP runs the fakeidp binary from dir on a free loopback port
// and returns its base URL; it is killed when the test ends.
func StartFakeIdP(t testing.TB, dir string, args ...string) string {
	t.Helper()
	cmd := exec.Command(filepath.Join(dir, "fakeidp"), append([]string{"--addr", "127.0.0.1:0"}, args...)...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatalf("fakeidp did not say where it listens: %v", err)
	}
	return strings.TrimSpace(strings.TrimPrefix(line, "listening on "))
}
