package main

import (
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"
)

// othersBusy runs f and returns the share of this machine's CPU time that
// other processes used meanwhile (0 to 1; -1 when /proc cannot tell): on
// a shared machine, what a parallel measurement had to share.
func othersBusy(f func()) float64 {
	m0, s0, ok0 := cpuTicks()
	t0 := time.Now()
	f()
	m1, s1, ok1 := cpuTicks()
	if !ok0 || !ok1 {
		return -1
	}
	const hz = 100 // USER_HZ, the unit of /proc/stat and /proc/self/stat
	avail := time.Since(t0).Seconds() * hz * float64(runtime.NumCPU())
	return min(1, max(0, float64((m1-m0)-(s1-s0))/avail))
}

// cpuTicks returns the busy ticks of all CPUs (/proc/stat: user, nice,
// system, irq, softirq, steal) and this process's own (utime + stime).
func cpuTicks() (machine, self int64, ok bool) {
	stat, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0, false
	}
	line, _, _ := strings.Cut(string(stat), "\n")
	f := strings.Fields(line)
	if len(f) < 9 || f[0] != "cpu" {
		return 0, 0, false
	}
	for _, i := range []int{1, 2, 3, 6, 7, 8} {
		n, _ := strconv.ParseInt(f[i], 10, 64)
		machine += n
	}
	own, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		return 0, 0, false
	}
	_, rest, found := strings.Cut(string(own), ") ") // after the command name
	g := strings.Fields(rest)
	if !found || len(g) < 13 {
		return 0, 0, false
	}
	ut, _ := strconv.ParseInt(g[11], 10, 64)
	st, _ := strconv.ParseInt(g[12], 10, 64)
	return machine, ut + st, true
}
