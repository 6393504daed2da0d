package chart

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	corev1 "k8s.io/api/core/v1"
)

// Existing stands for what exists in the cluster beside the release: the
// chart only references Secrets, and may reference ConfigMaps it does not
// render. Tests say what is in them: name, key, value.
type Existing struct {
	Secrets    map[string]map[string]string
	ConfigMaps map[string]map[string]string
}

// Container is one container of a rendered Deployment, with its pod.
type Container struct {
	Workload string // the Deployment's name
	Pod      *corev1.PodTemplateSpec
	*corev1.Container
}

// Containers returns every container of every rendered Deployment.
func (r *Release) Containers() []Container {
	var out []Container
	for _, d := range r.Deployments() {
		for i := range d.Spec.Template.Spec.Containers {
			out = append(out, Container{Workload: d.Name, Pod: &d.Spec.Template, Container: &d.Spec.Template.Spec.Containers[i]})
		}
	}
	return out
}

// ContainersRunning returns the containers whose command starts with bin.
func (r *Release) ContainersRunning(bin string) []Container {
	var out []Container
	for _, c := range r.Containers() {
		if len(c.Command) > 0 && c.Command[0] == bin {
			out = append(out, c)
		}
	}
	return out
}

// Env builds the container's environment as the kubelet does: env in
// order, values from ConfigMaps (the release's, else existing ones) and
// from existing Secrets, and
// $(VAR) references to variables defined before expanded. A reference to
// a Secret or ConfigMap key that does not exist is an error (the kubelet
// would not start the container) unless marked optional.
func (r *Release) Env(c Container, ex Existing) (map[string]string, error) {
	env := map[string]string{}
	var errs []error
	for _, from := range c.EnvFrom {
		switch {
		case from.SecretRef != nil:
			data, ok := ex.Secrets[from.SecretRef.Name]
			if !ok && !isTrue(from.SecretRef.Optional) {
				errs = append(errs, fmt.Errorf("envFrom: no Secret %s", from.SecretRef.Name))
			}
			for k, v := range data {
				env[from.Prefix+k] = v
			}
		case from.ConfigMapRef != nil:
			data, ok := r.configMap(from.ConfigMapRef.Name, ex)
			if !ok && !isTrue(from.ConfigMapRef.Optional) {
				errs = append(errs, fmt.Errorf("envFrom: no ConfigMap %s", from.ConfigMapRef.Name))
			}
			for k, v := range data {
				env[from.Prefix+k] = v
			}
		}
	}
	for _, e := range c.Env {
		switch {
		case e.ValueFrom == nil:
			env[e.Name] = Expand(e.Value, env)
		case e.ValueFrom.SecretKeyRef != nil:
			ref := e.ValueFrom.SecretKeyRef
			v, ok := ex.Secrets[ref.Name][ref.Key]
			if !ok {
				if !isTrue(ref.Optional) {
					errs = append(errs, fmt.Errorf("env %s: no key %s in Secret %s", e.Name, ref.Key, ref.Name))
				}
				continue
			}
			env[e.Name] = v
		case e.ValueFrom.ConfigMapKeyRef != nil:
			ref := e.ValueFrom.ConfigMapKeyRef
			data, _ := r.configMap(ref.Name, ex)
			v, ok := data[ref.Key]
			if !ok {
				if !isTrue(ref.Optional) {
					errs = append(errs, fmt.Errorf("env %s: no key %s in ConfigMap %s", e.Name, ref.Key, ref.Name))
				}
				continue
			}
			env[e.Name] = v
		default:
			errs = append(errs, fmt.Errorf("env %s: only values and Secret or ConfigMap keys are resolved here", e.Name))
		}
	}
	return env, errors.Join(errs...)
}

// CommandLine is the container's command and args with $(VAR) references to
// env expanded, as the kubelet runs it.
func (c Container) CommandLine(env map[string]string) []string {
	var out []string
	for _, a := range append(append([]string{}, c.Command...), c.Args...) {
		out = append(out, Expand(a, env))
	}
	return out
}

// Expand replaces $(VAR) references in s with env's values, as the
// kubelet does for env values, command and args: $$ stands for $, and a
// reference to an undefined variable is left as it is. (The kubelet's own
// implementation, in k8s.io/kubernetes, is not an importable module.)
func Expand(s string, env map[string]string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '$' || i+1 == len(s) {
			b.WriteByte(s[i])
			continue
		}
		switch s[i+1] {
		case '$':
			b.WriteByte('$')
			i++
		case '(':
			end := strings.IndexByte(s[i+2:], ')')
			if end < 0 {
				b.WriteString(s[i:])
				return b.String()
			}
			name := s[i+2 : i+2+end]
			if v, ok := env[name]; ok {
				b.WriteString(v)
			} else {
				b.WriteString(s[i : i+3+end])
			}
			i += 2 + end
		default:
			b.WriteByte('$')
		}
	}
	return b.String()
}

// MountFiles writes the files the container sees from ConfigMaps and
// Secrets (as Env finds them) under root, at root + their mount path, and
// returns a function that rewrites container paths in an argument or
// value (at its start or after '=') to those files, so that a binary's
// flag parser can read them.
func (r *Release) MountFiles(c Container, ex Existing, root string) (func(string) string, error) {
	volumes := map[string]corev1.Volume{}
	for _, v := range c.Pod.Spec.Volumes {
		volumes[v.Name] = v
	}
	var mounts []string
	for _, m := range c.VolumeMounts {
		v, ok := volumes[m.Name]
		if !ok {
			return nil, fmt.Errorf("volumeMount %s: no such volume", m.Name)
		}
		var data map[string]string
		var items []corev1.KeyToPath
		switch {
		case v.ConfigMap != nil:
			cm, ok := r.configMap(v.ConfigMap.Name, ex)
			if !ok {
				return nil, fmt.Errorf("volume %s: no ConfigMap %s", v.Name, v.ConfigMap.Name)
			}
			data, items = cm, v.ConfigMap.Items
		case v.Secret != nil:
			s, ok := ex.Secrets[v.Secret.SecretName]
			if !ok {
				return nil, fmt.Errorf("volume %s: no Secret %s", v.Name, v.Secret.SecretName)
			}
			data, items = s, v.Secret.Items
		default:
			continue
		}
		files := map[string]string{}
		if len(items) == 0 {
			for k, val := range data {
				files[k] = val
			}
		}
		for _, it := range items {
			val, ok := data[it.Key]
			if !ok {
				return nil, fmt.Errorf("volume %s: no key %s", v.Name, it.Key)
			}
			files[it.Path] = val
		}
		dir := filepath.Join(root, m.MountPath)
		for name, val := range files {
			p := filepath.Join(dir, name)
			if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
				return nil, err
			}
			if err := os.WriteFile(p, []byte(val), 0o600); err != nil {
				return nil, err
			}
		}
		mounts = append(mounts, m.MountPath)
	}
	return func(s string) string {
		for _, mp := range mounts {
			prefix := strings.TrimSuffix(mp, "/") + "/"
			if strings.HasPrefix(s, prefix) {
				return filepath.Join(root, s)
			}
			if k, v, ok := strings.Cut(s, "="); ok && strings.HasPrefix(v, prefix) {
				return k + "=" + filepath.Join(root, v)
			}
		}
		return s
	}, nil
}

// configMap returns the data of a ConfigMap the release renders, else of
// an existing one.
func (r *Release) configMap(name string, ex Existing) (map[string]string, bool) {
	if o := r.Get("ConfigMap", name); o != nil {
		return o.Typed.(*corev1.ConfigMap).Data, true
	}
	data, ok := ex.ConfigMaps[name]
	return data, ok
}

func isTrue(b *bool) bool { return b != nil && *b }
