// Package buildinfo tells which build a binary is: its version, the commit
// it was built from and the Go version, for --version output and the
// tokenmgr_build_info metric.
//
// Release builds stamp the version and commit with the linker:
//
//	go build -ldflags "-X github.com/tokenmgr/tokenmgr/internal/buildinfo.version=v0.2.0 \
//	  -X github.com/tokenmgr/tokenmgr/internal/buildinfo.revision=$(git rev-parse HEAD)" ./cmd/...
//
// Without them, both come from the Go build information
// (runtime/debug.ReadBuildInfo): the main module's version, which
// `go install module@version` and `go build` in a tagged checkout set,
// and the vcs.revision and vcs.modified settings that `go build` records
// in a git checkout (unless -buildvcs=false).
package buildinfo

import (
	"fmt"
	"runtime"
	"runtime/debug"

	"github.com/prometheus/client_golang/prometheus"
)

// Set with -ldflags -X; empty means "ask the Go build information".
var (
	version  string
	revision string
)

// Unknown stands for what neither the linker flags nor the Go build
// information say.
const (
	develVersion    = "(devel)" // as the go command calls an unversioned main module
	unknownRevision = "unknown"
)

// Info describes one build.
type Info struct {
	// Version is the release, e.g. v0.2.0, or "(devel)".
	Version string
	// Revision is the commit, with "-modified" appended when the work
	// tree had uncommitted changes; "unknown" when not recorded.
	Revision string
	// GoVersion is the Go release that built the binary, e.g. go1.26.8.
	GoVersion string
}

var current = read(version, revision, debug.ReadBuildInfo)

// Version is this binary's version: the -X value, else the main module's
// version from the Go build information, else "(devel)".
var Version = current.Version

// Get returns this binary's build.
func Get() Info { return current }

// read is Get with its sources as arguments, for tests.
func read(ldVersion, ldRevision string, buildInfo func() (*debug.BuildInfo, bool)) Info {
	in := Info{Version: ldVersion, Revision: ldRevision, GoVersion: runtime.Version()}
	bi, ok := buildInfo()
	if ok && bi.GoVersion != "" {
		in.GoVersion = bi.GoVersion
	}
	if in.Version == "" && ok && bi.Main.Version != "" {
		in.Version = bi.Main.Version
	}
	if in.Version == "" {
		in.Version = develVersion
	}
	if in.Revision == "" && ok {
		modified := false
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				in.Revision = s.Value
			case "vcs.modified":
				modified = s.Value == "true"
			}
		}
		if in.Revision != "" && modified {
			in.Revision += "-modified"
		}
	}
	if in.Revision == "" {
		in.Revision = unknownRevision
	}
	return in
}

// String is the --version line of binary, e.g.
//
//	refresher v0.2.0 (revision 6a6d759c, go1.26.8 linux/amd64)
func String(binary string) string { return current.line(binary) }

func (in Info) line(binary string) string {
	return fmt.Sprintf("%s %s (revision %s, %s %s/%s)", binary, in.Version, in.Revision, in.GoVersion, runtime.GOOS, runtime.GOARCH)
}

// NewCollector returns the tokenmgr_build_info gauge: always 1, labelled
// with this binary's version, revision and Go version, so that dashboards
// and alerts can join on what runs where (a rollout shows as two
// versions at once). Register it beside collectors.NewBuildInfoCollector,
// which exports go_build_info for the Go module instead.
func NewCollector() prometheus.Collector { return current.collector() }

func (in Info) collector() prometheus.Collector {
	return prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "tokenmgr_build_info",
		Help: "A metric with a constant '1' value labelled by the tokenmgr version, revision and Go version of this binary.",
		ConstLabels: prometheus.Labels{
			"version":   in.Version,
			"revision":  in.Revision,
			"goversion": in.GoVersion,
		},
	}, func() float64 { return 1 })
}
