package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"time"
)

// machine is what the run was measured on, detected at run time.
type machine struct {
	os, arch, kind string // kind: "VM" when the CPU reports a hypervisor
	cpus           int
	memGiB         int
	goVersion      string
	redis          string // redis-server version, or "none"
	date           string
}

func detectMachine() machine {
	m := machine{os: runtime.GOOS, arch: runtime.GOARCH, kind: "machine", cpus: runtime.NumCPU(),
		goVersion: strings.TrimPrefix(runtime.Version(), "go"), redis: "none", date: time.Now().Format("2006-01-02")}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil && regexp.MustCompile(`(?m)^flags\s*:.*\bhypervisor\b`).Match(b) {
		m.kind = "VM"
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		if f := regexp.MustCompile(`MemTotal:\s+(\d+) kB`).FindSubmatch(b); f != nil {
			kb, _ := strconv.ParseInt(string(f[1]), 10, 64)
			m.memGiB = int((kb + 1<<19) >> 20)
		}
	}
	if out, err := exec.Command("redis-server", "--version").Output(); err == nil {
		if f := regexp.MustCompile(`v=(\S+)`).FindSubmatch(out); f != nil {
			m.redis = string(f[1])
		}
	}
	return m
}

func (m machine) line() string {
	return fmt.Sprintf("%s/%s, %d CPUs, %d GiB, Go %s, Redis %s, %s", m.os, m.arch, m.cpus, m.memGiB, m.goVersion, m.redis, m.date)
}

// document is BENCHMARKS.md: how it was made, on what, the goals with
// their verdicts, why each miss misses, and every figure's tables.
func document(cmd string, m machine, took time.Duration, figs []ranFigure) []byte {
	var b bytes.Buffer
	p := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	p("# Benchmarks\n\n")
	p("Every figure is measured beside its peer in the same run, on this machine. This file is written,\n")
	p("verdicts included, by one command (the plots in `docs/bench` are redrawn by the same run):\n\n")
	p("```sh\n%s\n```\n\n", cmd)
	p("Figure 1 is also a Go benchmark: `go test -run '^$' -bench BenchmarkToken -cpu 1,2 ./pkg/tokenmgr/`.\n\n")
	p("Figures 5, 7 and 8 start a throwaway `redis-server` (figure 5 falls back to miniredis, 7 and 8 are\n")
	p("skipped without one) and figure 9 a 3-master Redis Cluster of them (`redis-cli --cluster create`);\n")
	p("the others use miniredis and the fake IdP, with a clock that is the wall clock plus an offset (so a\n")
	p("clock read costs what it costs in production). Command counts leave out the connection handshake\n")
	p("(HELLO, CLIENT SETINFO). The numbers below are one run of the command, taken on %s on a shared\n", m.date)
	p("%d-core %s/%s %s (%d GiB) with Go %s and Redis %s, while other work ran on it; the whole command\n", m.cpus, m.os, m.arch, m.kind, m.memGiB, m.goVersion, m.redis)
	p("took %s. Rerun before trusting a small difference.\n\n", took.Round(time.Second))

	p("## Goals and results\n\n")
	p("Each verdict is computed by the run from the numbers it measured.\n\n")
	p("| # | figure | peer | goal | result |\n|---|---|---|---|---|\n")
	var misses []ranFigure
	for _, f := range figs {
		p("| %d | %s | %s | %s | **%s**: %s |\n", f.n, f.short, f.peer, f.goal, f.v.status(), f.v.result)
		if !f.v.met && !f.v.skipped {
			misses = append(misses, f)
		}
	}
	p("\n")
	if len(misses) > 0 {
		p("Why the misses miss:\n\n")
		for _, f := range misses {
			p("- **Figure %d.** %s\n", f.n, f.v.why)
		}
		p("\n")
	}
	p("## The run\n\n")
	p("Printed by `%s` (also to stdout):\n\n", cmd)
	for _, f := range figs {
		p("## Figure %d: %s\n\n%s\n", f.n, f.name, strings.TrimRight(f.md, "\n")+"\n")
	}
	return b.Bytes()
}
