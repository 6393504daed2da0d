package main

import (
	"context"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// startCluster runs masters throwaway redis-server processes in cluster
// mode, joins them with redis-cli --cluster create (no replicas), and
// waits until every node reports cluster_state:ok. It returns their
// addresses.
func startCluster(ctx context.Context, masters int) ([]string, func(), error) {
	if _, err := exec.LookPath("redis-cli"); err != nil {
		return nil, nil, fmt.Errorf("redis-cli not found")
	}
	var addrs []string
	var stops []func()
	stop := func() {
		for _, s := range stops {
			s()
		}
	}
	for i := range masters {
		addr, s, err := startRedis("--cluster-enabled", "yes", "--cluster-config-file", "nodes-"+strconv.Itoa(i)+".conf")
		if err != nil {
			stop()
			return nil, nil, err
		}
		addrs = append(addrs, addr)
		stops = append(stops, s)
	}
	args := append(append([]string{"--cluster", "create"}, addrs...), "--cluster-replicas", "0", "--cluster-yes")
	if out, err := exec.CommandContext(ctx, "redis-cli", args...).CombinedOutput(); err != nil {
		stop()
		return nil, nil, fmt.Errorf("redis-cli --cluster create: %v: %s", err, lastLine(string(out)))
	}
	for _, addr := range addrs {
		c := redis.NewClient(&redis.Options{Addr: addr})
		deadline := time.Now().Add(30 * time.Second)
		for {
			info, _ := c.ClusterInfo(ctx).Result()
			if strings.Contains(info, "cluster_state:ok") {
				break
			}
			if time.Now().After(deadline) {
				c.Close()
				stop()
				return nil, nil, fmt.Errorf("cluster node %s not ok within 30s", addr)
			}
			time.Sleep(50 * time.Millisecond)
		}
		c.Close()
	}
	return addrs, stop, nil
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

// nodeStats reads what figure 9 measures on each node: CPU seconds of the
// server (used_cpu_sys + used_cpu_user) and the calls of PUBLISH and
// SPUBLISH (commandstats; calls from scripts included).
type nodeStats struct {
	cpu               float64
	publish, spublish int64
}

func readNodeStats(ctx context.Context, c *redis.Client) (nodeStats, error) {
	info, err := c.Info(ctx, "cpu", "commandstats").Result()
	if err != nil {
		return nodeStats{}, err
	}
	var s nodeStats
	for _, line := range strings.Split(info, "\n") {
		line = strings.TrimSpace(line)
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		switch k {
		case "used_cpu_sys", "used_cpu_user":
			f, _ := strconv.ParseFloat(v, 64)
			s.cpu += f
		case "cmdstat_publish", "cmdstat_spublish":
			calls, _, _ := strings.Cut(strings.TrimPrefix(v, "calls="), ",")
			n, _ := strconv.ParseInt(calls, 10, 64)
			if k == "cmdstat_publish" {
				s.publish = n
			} else {
				s.spublish = n
			}
		}
	}
	return s, nil
}
