package buildinfo

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestRead(t *testing.T) {
	vcs := func(rev, modified string) []debug.BuildSetting {
		return []debug.BuildSetting{{Key: "-trimpath", Value: "true"}, {Key: "vcs", Value: "git"}, {Key: "vcs.revision", Value: rev}, {Key: "vcs.modified", Value: modified}}
	}
	for _, tc := range []struct {
		name                 string
		ldVersion, ldRev     string
		bi                   *debug.BuildInfo // nil: no build information
		wantVersion, wantRev string
	}{
		{name: "linker flags win", ldVersion: "v0.2.0", ldRev: "abc123",
			bi:          &debug.BuildInfo{Main: debug.Module{Version: "v0.1.0"}, Settings: vcs("def456", "true")},
			wantVersion: "v0.2.0", wantRev: "abc123"},
		{name: "go install module@version", bi: &debug.BuildInfo{Main: debug.Module{Version: "v0.1.0"}},
			wantVersion: "v0.1.0", wantRev: "unknown"},
		{name: "git checkout, clean", bi: &debug.BuildInfo{Main: debug.Module{Version: "(devel)"}, Settings: vcs("def456", "false")},
			wantVersion: "(devel)", wantRev: "def456"},
		{name: "git checkout, modified", bi: &debug.BuildInfo{Main: debug.Module{Version: "v0.1.1-0.20261129000000-def456+dirty"}, Settings: vcs("def456", "true")},
			wantVersion: "v0.1.1-0.20261129000000-def456+dirty", wantRev: "def456-modified"},
		{name: "version flag only", ldVersion: "v0.2.0", bi: &debug.BuildInfo{Settings: vcs("def456", "false")},
			wantVersion: "v0.2.0", wantRev: "def456"},
		{name: "no build information", wantVersion: "(devel)", wantRev: "unknown"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := read(tc.ldVersion, tc.ldRev, func() (*debug.BuildInfo, bool) { return tc.bi, tc.bi != nil })
			if got.Version != tc.wantVersion || got.Revision != tc.wantRev {
				t.Errorf("got version %q revision %q, want %q %q", got.Version, got.Revision, tc.wantVersion, tc.wantRev)
			}
			if got.GoVersion != runtime.Version() {
				t.Errorf("got Go version %q, want %q", got.GoVersion, runtime.Version())
			}
		})
	}
}

func TestLine(t *testing.T) {
	in := Info{Version: "v0.2.0", Revision: "abc123", GoVersion: "go1.26.8"}
	want := "refresher v0.2.0 (revision abc123, go1.26.8 " + runtime.GOOS + "/" + runtime.GOARCH + ")"
	if got := in.line("refresher"); got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}

func TestCollector(t *testing.T) {
	c := Info{Version: "v0.2.0", Revision: "abc123", GoVersion: "go1.26.8"}.collector()
	problems, err := testutil.CollectAndLint(c)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}
	want := `
# HELP tokenmgr_build_info A metric with a constant '1' value labelled by the tokenmgr version, revision and Go version of this binary.
# TYPE tokenmgr_build_info gauge
tokenmgr_build_info{goversion="go1.26.8",revision="abc123",version="v0.2.0"} 1
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(want)); err != nil {
		t.Error(err)
	}
	// The package's own collector describes this binary.
	if err := testutil.CollectAndCompare(NewCollector(), strings.NewReader(strings.NewReplacer(
		`goversion="go1.26.8",revision="abc123",version="v0.2.0"`,
		`goversion="`+Get().GoVersion+`",revision="`+Get().Revision+`",version="`+Version+`"`).Replace(want))); err != nil {
		t.Error(err)
	}
}

// The variables the Dockerfile stamps with -ldflags -X are the ones read:
// build a program with them and run it.
func TestLinkerFlags(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a binary")
	}
	bin := filepath.Join(t.TempDir(), "printversion")
	const pkg = "github.com/tokenmgr/tokenmgr/internal/buildinfo"
	build := exec.Command("go", "build", "-trimpath", "-o", bin,
		"-ldflags", "-s -w -X "+pkg+".version=v9.8.7 -X "+pkg+".revision=0123abc", "./testdata/printversion")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	out, err := exec.Command(bin).Output()
	if err != nil {
		t.Fatal(err)
	}
	want := "printversion v9.8.7 (revision 0123abc, " + runtime.Version() + " " + runtime.GOOS + "/" + runtime.GOARCH + ")\nv9.8.7\n"
	if string(out) != want {
		t.Errorf("got %q, want %q", out, want)
	}
}
