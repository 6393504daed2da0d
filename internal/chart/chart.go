// Package chart loads, lints and renders the project's Helm chart
// (deploy/helm/tokenmgr) with Helm's own Go packages, as `helm lint` and
// `helm template` would, and decodes every rendered object strictly into
// its Kubernetes API type, for tests: no cluster runs where the tests run.
package chart

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"
	"helm.sh/helm/v3/pkg/lint"
	"helm.sh/helm/v3/pkg/lint/support"
	"helm.sh/helm/v3/pkg/releaseutil"
	"sigs.k8s.io/yaml"
)

// Dir is the chart's directory, relative to the module root.
const Dir = "deploy/helm/tokenmgr"

// FullValues is the values file, in the chart directory, that turns every
// optional part of the chart on.
const FullValues = "ci/full-values.yaml"

// Path returns the chart's directory: Dir under the module root, found
// from the working directory up (tests run in their package's directory).
func Path() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return filepath.Join(dir, Dir), nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory")
		}
		dir = parent
	}
}

// Options are a release's name, namespace and values, as given to helm.
type Options struct {
	ReleaseName string // default "tokenmgr"
	Namespace   string // default "tokenmgr"
	// ValuesFiles are read in order, each over the ones before (helm -f);
	// relative paths are relative to the chart directory.
	ValuesFiles []string
	// Values go over the files (as helm --set does).
	Values map[string]any
}

func (o Options) release() chartutil.ReleaseOptions {
	r := chartutil.ReleaseOptions{Name: o.ReleaseName, Namespace: o.Namespace, IsInstall: true, Revision: 1}
	if r.Name == "" {
		r.Name = "tokenmgr"
	}
	if r.Namespace == "" {
		r.Namespace = "tokenmgr"
	}
	return r
}

// values merges the files and Values into the values a user passes (the
// chart's defaults are not in them).
func (o Options) values(dir string) (map[string]any, error) {
	vals := map[string]any{}
	for _, f := range o.ValuesFiles {
		if !filepath.IsAbs(f) {
			f = filepath.Join(dir, f)
		}
		v, err := chartutil.ReadValuesFile(f)
		if err != nil {
			return nil, err
		}
		vals = chartutil.MergeTables(v.AsMap(), vals)
	}
	if len(o.Values) == 0 {
		return vals, nil
	}
	// A copy: merging writes into the tables of its first argument.
	raw, err := yaml.Marshal(o.Values)
	if err != nil {
		return nil, err
	}
	set, err := chartutil.ReadValues(raw)
	if err != nil {
		return nil, err
	}
	return chartutil.MergeTables(set.AsMap(), vals), nil
}

// Lint runs Helm's linter on the chart in dir with o's values, as
// `helm lint --strict` does (values schema included), and returns its
// messages of severity at least min (support.InfoSev, WarningSev,
// ErrorSev).
func Lint(dir string, o Options, min int) ([]support.Message, error) {
	vals, err := o.values(dir)
	if err != nil {
		return nil, err
	}
	l := lint.AllWithKubeVersionAndSchemaValidation(dir, vals, o.release().Namespace, nil, false)
	var out []support.Message
	for _, m := range l.Messages {
		if m.Severity >= min {
			out = append(out, m)
		}
	}
	return out, nil
}

// Release is what `helm template` prints for a chart: its objects, each
// decoded strictly, and its notes.
type Release struct {
	Notes   string
	Objects []*Object
}

// Render renders the chart in dir with o, as `helm install --dry-run`
// would with Helm's default capabilities, except that a template reading
// a value that does not exist fails (engine.Strict). Values are checked
// against the chart's values.schema.json. Every object is decoded strictly
// (see Decode); the first objects that do not decode make the error.
func Render(dir string, o Options) (*Release, error) {
	ch, err := loader.Load(dir)
	if err != nil {
		return nil, err
	}
	vals, err := o.values(dir)
	if err != nil {
		return nil, err
	}
	caps := chartutil.DefaultCapabilities.Copy()
	top, err := chartutil.ToRenderValuesWithSchemaValidation(ch, vals, o.release(), caps, false)
	if err != nil {
		return nil, err
	}
	files, err := engine.Engine{Strict: true}.Render(ch, top)
	if err != nil {
		return nil, err
	}
	rel := &Release{}
	for name, content := range files {
		if strings.HasSuffix(name, "NOTES.txt") {
			rel.Notes = content
			delete(files, name)
		}
	}
	hooks, manifests, err := releaseutil.SortManifests(files, caps.APIVersions, releaseutil.InstallOrder)
	if err != nil {
		return nil, err
	}
	if len(hooks) > 0 {
		return nil, fmt.Errorf("%s: the chart has no hooks, yet renders one", hooks[0].Path)
	}
	var errs []error
	for _, m := range manifests {
		obj, err := Decode(m.Content)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", m.Name, err))
			continue
		}
		obj.Source = m.Name
		rel.Objects = append(rel.Objects, obj)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return rel, nil
}
