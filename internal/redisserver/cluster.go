package redisserver

import (
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// StartCluster builds a Redis Cluster of masters masters, each with
// replicas replicas, with redis-cli --cluster create, and waits until it is
// ok and every replica is in sync. Masters come first.
func StartCluster(t testing.TB, masters, replicas int) []*Server {
	t.Helper()
	var nodes []*Server
	for i := range masters * (1 + replicas) {
		nodes = append(nodes, Start(t, "--cluster-enabled", "yes", "--cluster-config-file", "nodes-"+strconv.Itoa(i)+"-"+strconv.FormatInt(time.Now().UnixNano(), 10)+".conf"))
	}
	args := []string{"--cluster", "create"}
	for _, n := range nodes {
		args = append(args, n.Addr())
	}
	args = append(args, "--cluster-replicas", strconv.Itoa(replicas), "--cluster-yes")
	if out, err := exec.Command("redis-cli", args...).CombinedOutput(); err != nil {
		t.Fatalf("redis-cli --cluster create: %v\n%s", err, out)
	}
	for _, n := range nodes {
		deadline := time.Now().Add(30 * time.Second)
		for {
			info, _ := bulk(n.Addr(), "CLUSTER INFO\r\n")
			if strings.Contains(info, "cluster_state:ok") {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("redis-server on port %d: cluster not ok within 30s: %s", n.port, lastLines(info, 5))
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	for _, n := range nodes {
		if info, _ := n.Info(); strings.Contains(info, "role:slave") {
			n.WaitInfo("master_link_status:up", 30*time.Second)
		}
	}
	return nodes
}
