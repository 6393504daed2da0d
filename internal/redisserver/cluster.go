package redisserver

import (
	"bufio"
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

// SlotOwner returns the master serving slot and one of its replicas, as
// CLUSTER NODES on nodes[0] says.
func SlotOwner(t testing.TB, nodes []*Server, slot int64) (master, replica *Server) {
	t.Helper()
	text, err := bulk(nodes[0].Addr(), "CLUSTER NODES\r\n")
	if err != nil {
		t.Fatalf("CLUSTER NODES: %v", err)
	}
	byPort := map[string]*Server{}
	for _, n := range nodes {
		byPort[strconv.Itoa(n.port)] = n
	}
	// A line: ID IP:PORT@BUS FLAGS MASTER-ID PING PONG EPOCH STATE SLOT...
	type node struct{ id, port, masterID string }
	var owner node
	var all []node
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 8 {
			continue
		}
		hostPort, _, _ := strings.Cut(fields[1], "@")
		n := node{id: fields[0], port: hostPort[strings.LastIndex(hostPort, ":")+1:], masterID: fields[3]}
		all = append(all, n)
		for _, r := range fields[8:] {
			lo, hi, ok := strings.Cut(r, "-")
			if !ok {
				hi = lo
			}
			a, err1 := strconv.ParseInt(lo, 10, 64)
			b, err2 := strconv.ParseInt(hi, 10, 64)
			if err1 == nil && err2 == nil && a <= slot && slot <= b {
				owner = n
			}
		}
	}
	for _, n := range all {
		if owner.id != "" && n.masterID == owner.id && byPort[owner.port] != nil && byPort[n.port] != nil {
			return byPort[owner.port], byPort[n.port]
		}
	}
	t.Fatalf("no master with a replica serves slot %d:\n%s", slot, text)
	return nil, nil
}
