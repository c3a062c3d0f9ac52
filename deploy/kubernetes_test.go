// Package deploy holds the Kubernetes manifests (kubernetes/). No cluster
// runs where the tests do, so the tests decode every manifest strictly into
// Kubernetes' own API types (an unknown or misspelt field fails) and check
// that the manifests agree with the code: roles and flags the binary has,
// variables it reads, the port and probe routes it serves, the streams and
// consumer groups KEDA watches, and shutdown times.
//
// It is a module of its own so that Kubernetes' API packages never enter
// the product's go.mod.
package deploy_test

import (
	"bytes"
	"fmt"
	"maps"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/yaml"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/config"
	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/handlers"
)

const dir = "kubernetes"

// kustomization is the part of kustomize's Kustomization these manifests
// use; strict decoding refuses anything else.
type kustomization struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Labels     []struct {
		Pairs            map[string]string `json:"pairs"`
		IncludeSelectors bool              `json:"includeSelectors,omitempty"`
	} `json:"labels,omitempty"`
	Resources []string `json:"resources"`
	Images    []struct {
		Name    string `json:"name"`
		NewName string `json:"newName,omitempty"`
		NewTag  string `json:"newTag,omitempty"`
	} `json:"images,omitempty"`
}

// scaledObject is KEDA's ScaledObject (keda.sh/v1alpha1), the fields of its
// spec as KEDA documents them; strict decoding refuses a misspelt one.
type scaledObject struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		ScaleTargetRef struct {
			APIVersion             string `json:"apiVersion,omitempty"`
			Kind                   string `json:"kind,omitempty"`
			Name                   string `json:"name"`
			EnvSourceContainerName string `json:"envSourceContainerName,omitempty"`
		} `json:"scaleTargetRef"`
		PollingInterval  *int32 `json:"pollingInterval,omitempty"`
		CooldownPeriod   *int32 `json:"cooldownPeriod,omitempty"`
		IdleReplicaCount *int32 `json:"idleReplicaCount,omitempty"`
		MinReplicaCount  *int32 `json:"minReplicaCount,omitempty"`
		MaxReplicaCount  *int32 `json:"maxReplicaCount,omitempty"`
		Triggers         []struct {
			Type              string            `json:"type"`
			Name              string            `json:"name,omitempty"`
			Metadata          map[string]string `json:"metadata"`
			AuthenticationRef *struct {
				Name string `json:"name"`
				Kind string `json:"kind,omitempty"`
			} `json:"authenticationRef,omitempty"`
			MetricType string `json:"metricType,omitempty"`
		} `json:"triggers"`
	} `json:"spec"`
}

// redisStreamsKeys are the metadata keys of KEDA's redis-streams scaler.
var redisStreamsKeys = []string{
	"address", "host", "port", "addressFromEnv", "hostFromEnv", "portFromEnv",
	"usernameFromEnv", "passwordFromEnv", "stream", "consumerGroup", "pendingEntriesCount",
	"streamLength", "lagCount", "activationLagCount", "enableTLS", "unsafeSsl", "databaseIndex",
}

type manifests struct {
	deployments map[string]*appsv1.Deployment
	services    map[string]*corev1.Service
	configMaps  map[string]*corev1.ConfigMap
	secrets     map[string]*corev1.Secret
	claims      map[string]*corev1.PersistentVolumeClaim
	budgets     map[string]*policyv1.PodDisruptionBudget
	scalers     map[string]*scaledObject
}

// load decodes every resource kustomization.yaml lists, strictly, and fails
// on a file in the folder that it does not list.
func load(t *testing.T) manifests {
	t.Helper()
	var k kustomization
	strict(t, "kustomization.yaml", read(t, "kustomization.yaml"), &k)
	if k.APIVersion != "kustomize.config.k8s.io/v1beta1" || k.Kind != "Kustomization" {
		t.Fatalf("kustomization.yaml: apiVersion %q kind %q", k.APIVersion, k.Kind)
	}
	files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if name := filepath.Base(f); name != "kustomization.yaml" && !slices.Contains(k.Resources, name) {
			t.Errorf("%s is not among kustomization.yaml's resources: kubectl apply -k leaves it out", name)
		}
	}
	m := manifests{
		deployments: map[string]*appsv1.Deployment{}, services: map[string]*corev1.Service{},
		configMaps: map[string]*corev1.ConfigMap{}, secrets: map[string]*corev1.Secret{},
		claims: map[string]*corev1.PersistentVolumeClaim{}, budgets: map[string]*policyv1.PodDisruptionBudget{},
		scalers: map[string]*scaledObject{},
	}
	for _, file := range k.Resources {
		for i, doc := range documents(read(t, file)) {
			where := fmt.Sprintf("%s (document %d)", file, i+1)
			var tm metav1.TypeMeta
			if err := yaml.Unmarshal(doc, &tm); err != nil {
				t.Fatalf("%s: %v", where, err)
			}
			var name string
			switch gvk := tm.APIVersion + " " + tm.Kind; gvk {
			case "apps/v1 Deployment":
				name = add(t, where, doc, m.deployments)
			case "v1 Service":
				name = add(t, where, doc, m.services)
			case "v1 ConfigMap":
				name = add(t, where, doc, m.configMaps)
			case "v1 Secret":
				name = add(t, where, doc, m.secrets)
			case "v1 PersistentVolumeClaim":
				name = add(t, where, doc, m.claims)
			case "policy/v1 PodDisruptionBudget":
				name = add(t, where, doc, m.budgets)
			case "keda.sh/v1alpha1 ScaledObject":
				name = add(t, where, doc, m.scalers)
			default:
				t.Fatalf("%s: %s is not a kind this test knows; teach it", where, gvk)
			}
			if name == "" {
				t.Errorf("%s: no metadata.name", where)
			}
		}
	}
	return m
}

// add decodes doc strictly into a new T and files it under its name.
func add[T any, P interface {
	*T
	GetName() string
}](t *testing.T, where string, doc []byte, into map[string]*T) string {
	t.Helper()
	v := P(new(T))
	strict(t, where, doc, v)
	into[v.GetName()] = v
	return v.GetName()
}

func read(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// documents splits a YAML stream at its "---" lines.
func documents(b []byte) [][]byte {
	var out [][]byte
	for _, doc := range regexp.MustCompile(`(?m)^---[ \t]*$`).Split(string(b), -1) {
		if strings.TrimSpace(regexp.MustCompile(`(?m)^\s*#.*$`).ReplaceAllString(doc, "")) != "" {
			out = append(out, []byte(doc))
		}
	}
	return out
}

func strict(t *testing.T, where string, doc []byte, v any) {
	t.Helper()
	if err := yaml.UnmarshalStrict(doc, v); err != nil {
		t.Fatalf("%s: %v", where, err)
	}
}

func TestManifestsDecodeStrictly(t *testing.T) {
	m := load(t)
	for _, name := range []string{"conveyor-api", "conveyor-handler", "conveyor-projector", "conveyor-scheduler"} {
		if m.deployments[name] == nil {
			t.Errorf("no Deployment %s", name)
		}
	}
	if len(m.scalers) == 0 {
		t.Error("no KEDA ScaledObject")
	}
}

// roles maps each Deployment to the role its main container runs.
var roles = map[string]string{
	"conveyor-api": "api", "conveyor-handler": "handler",
	"conveyor-projector": "projector", "conveyor-scheduler": "scheduler",
}

// env is what a container's process sees: its ConfigMaps and Secrets, then
// its own env (which wins).
func env(t *testing.T, m manifests, where string, c corev1.Container) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, from := range c.EnvFrom {
		switch {
		case from.ConfigMapRef != nil:
			cm := m.configMaps[from.ConfigMapRef.Name]
			if cm == nil {
				t.Errorf("%s: envFrom names ConfigMap %q, which is not among the manifests", where, from.ConfigMapRef.Name)
				continue
			}
			for k, v := range cm.Data {
				out[from.Prefix+k] = v
			}
		case from.SecretRef != nil:
			s := m.secrets[from.SecretRef.Name]
			if s == nil {
				t.Errorf("%s: envFrom names Secret %q, which is not among the manifests", where, from.SecretRef.Name)
				continue
			}
			for k, v := range s.StringData {
				out[from.Prefix+k] = v
			}
			for k, v := range s.Data {
				out[from.Prefix+k] = string(v)
			}
		}
	}
	for _, e := range c.Env {
		out[e.Name] = e.Value
	}
	return out
}

// TestEnvironmentIsRead: every variable the manifests set is one the code
// reads (a misspelt name would be ignored without a word).
func TestEnvironmentIsRead(t *testing.T) {
	m := load(t)
	known := map[string]bool{"GOGC": true, "GOMEMLIMIT": true}
	for _, v := range config.Vars {
		known[v.Name], known[v.Name+"_FILE"] = true, true
	}
	for _, d := range m.deployments {
		for _, c := range append(slices.Clone(d.Spec.Template.Spec.InitContainers), d.Spec.Template.Spec.Containers...) {
			where := d.Name + "/" + c.Name
			vars := env(t, m, where, c)
			for name := range vars {
				if !known[name] {
					t.Errorf("%s: %s is not a variable Conveyor reads (config.Vars)", where, name)
				}
			}
			// The configuration the container gets must load.
			if _, err := config.Load(func(k string) string { return vars[k] }); err != nil {
				t.Errorf("%s: its configuration does not load: %v", where, err)
			}
		}
	}
}

// TestRolesExist runs the binary with each container's arguments and
// --help: a role or flag it does not have exits 2.
func TestRolesExist(t *testing.T) {
	m := load(t)
	bin := filepath.Join(t.TempDir(), "conveyor")
	build := exec.Command("go", "build", "-o", bin, "./cmd/conveyor")
	build.Dir = ".." // the product's module, not this one
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	for _, d := range m.deployments {
		spec := d.Spec.Template.Spec
		for _, c := range append(slices.Clone(spec.InitContainers), spec.Containers...) {
			where := d.Name + "/" + c.Name
			if len(c.Command) > 0 {
				t.Errorf("%s: command replaces the image's entrypoint; set args", where)
			}
			if len(c.Args) == 0 {
				t.Errorf("%s: no args: the image would run its default role", where)
				continue
			}
			out, err := exec.Command(bin, append(slices.Clone(c.Args), "--help")...).CombinedOutput()
			if err != nil {
				t.Errorf("%s: conveyor %s --help: %v\n%s", where, strings.Join(c.Args, " "), err, out)
			}
		}
		main := spec.Containers[0]
		if want := roles[d.Name]; main.Args[0] != want {
			t.Errorf("%s runs %q, want %q", d.Name, main.Args[0], want)
		}
		if len(spec.InitContainers) != 1 || spec.InitContainers[0].Args[0] != "migrate" {
			t.Errorf("%s: no migrate init container: a new pod could start before the schema and consumer groups exist", d.Name)
		}
	}
}

// TestPodsMatchTheImage: ports and probes are the ones the role serves, the
// user is the image's, and everything a role writes is on a volume (the
// root file system is read-only).
func TestPodsMatchTheImage(t *testing.T) {
	m := load(t)
	dockerfile, err := os.ReadFile("../docker/Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(dockerfile, []byte("\nUSER 65532:65532\n")) {
		t.Fatal("the image no longer runs as uid 65532 (distroless's nonroot), by number: update runAsUser and this test")
	}
	_, port, err := net.SplitHostPort(defaultOf(t, "HTTP_ADDR"))
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range m.deployments {
		spec := d.Spec.Template.Spec
		if sel, err := metav1.LabelSelectorAsSelector(d.Spec.Selector); err != nil || !sel.Matches(labels.Set(d.Spec.Template.Labels)) {
			t.Errorf("%s: its selector does not match its pods' labels (%v)", d.Name, err)
		}
		psc := spec.SecurityContext
		if psc == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot || psc.RunAsUser == nil || *psc.RunAsUser != 65532 ||
			psc.FSGroup == nil || *psc.FSGroup != 65532 {
			t.Errorf("%s: pod must run as the image's nonroot user 65532, with fsGroup 65532 so that volumes are writable", d.Name)
		}
		volumes := map[string]corev1.Volume{}
		for _, v := range spec.Volumes {
			volumes[v.Name] = v
			if v.PersistentVolumeClaim != nil && m.claims[v.PersistentVolumeClaim.ClaimName] == nil {
				t.Errorf("%s: volume %s claims %q, which is not among the manifests", d.Name, v.Name, v.PersistentVolumeClaim.ClaimName)
			}
		}
		for _, c := range append(slices.Clone(spec.InitContainers), spec.Containers...) {
			where := d.Name + "/" + c.Name
			if c.Image != "conveyor" {
				t.Errorf("%s: image %q; kustomization.yaml's images entry sets the conveyor image", where, c.Image)
			}
			sc := c.SecurityContext
			if sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem ||
				sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
				t.Errorf("%s: want a read-only root file system and no privilege escalation", where)
			}
			for _, vm := range c.VolumeMounts {
				if _, ok := volumes[vm.Name]; !ok {
					t.Errorf("%s: mounts %q, which the pod does not declare", where, vm.Name)
				}
			}
		}
		main := spec.Containers[0]
		where := d.Name + "/" + main.Name
		vars := env(t, m, where, main)
		// What the role writes to must be mounted, since the root is read-only.
		writes := []string{"/tmp"}
		switch roles[d.Name] {
		case "api", "scheduler":
			writes = append(writes, vars["BLOB_DIR"])
		case "handler":
			writes = append(writes, vars["BLOB_DIR"], vars["OUTBOX_DIR"])
		}
		for _, p := range writes {
			if p == "" {
				t.Errorf("%s: a folder it writes is not set (BLOB_DIR or OUTBOX_DIR)", where)
				continue
			}
			if !mounted(main, p) {
				t.Errorf("%s: %s is not on a volume, and the root file system is read-only", where, p)
			}
		}
		// Blobs are shared: the api writes them, the handlers read them, the
		// scheduler removes expired ones.
		if r := roles[d.Name]; r != "projector" {
			if v, ok := volumes[mountOf(main, vars["BLOB_DIR"])]; !ok || v.PersistentVolumeClaim == nil || v.PersistentVolumeClaim.ClaimName != "conveyor-blobs" {
				t.Errorf("%s: BLOB_DIR %s is not on the shared conveyor-blobs claim", where, vars["BLOB_DIR"])
			}
		}
		var http *corev1.ContainerPort
		for i, p := range main.Ports {
			if p.Name == "http" {
				http = &main.Ports[i]
			}
		}
		if http == nil || strconv.Itoa(int(http.ContainerPort)) != port {
			t.Errorf("%s: want a port named http on %s, HTTP_ADDR's default port", where, port)
		}
		probe := func(kind string, p *corev1.Probe, path string) {
			if p == nil || p.HTTPGet == nil {
				t.Errorf("%s: no HTTP %s probe", where, kind)
				return
			}
			if p.HTTPGet.Path != path || p.HTTPGet.Port.String() != "http" {
				t.Errorf("%s: %s probe gets %s on port %s, want %s on http", where, kind, p.HTTPGet.Path, p.HTTPGet.Port.String(), path)
			}
		}
		// Liveness must not depend on Redis or PostgreSQL: /readyz there
		// would restart every pod while a dependency is down.
		probe("liveness", main.LivenessProbe, "/healthz")
		probe("readiness", main.ReadinessProbe, "/readyz")
		// GOMEMLIMIT at the limit leaves no room for what is not heap: the
		// pod is killed before the collector works hard.
		limit, ok := main.Resources.Limits[corev1.ResourceMemory]
		soft, err := memLimit(vars["GOMEMLIMIT"])
		if !ok || err != nil || float64(soft) > 0.9*float64(limit.Value()) || float64(soft) < 0.75*float64(limit.Value()) {
			t.Errorf("%s: GOMEMLIMIT %q (%v) is not 75–90%% of the memory limit %s", where, vars["GOMEMLIMIT"], err, limit.String())
		}
	}
}

// shutdownAfterDrain is how long a role may still take once its
// SHUTDOWN_TIMEOUT is over: ending its blocked stream reads (BlockTime, 1s),
// handing back what it had not started (2s), waiting for handlers that ignore
// cancellation (5s) and releasing its consumer name (2s), plus slack.
const shutdownAfterDrain = 15 * time.Second

// TestShutdownFitsTheGracePeriod: Kubernetes kills a pod
// terminationGracePeriodSeconds after SIGTERM; the role must be done first
// (SHUTDOWN_DELAY, then SHUTDOWN_TIMEOUT to drain and flush acks).
func TestShutdownFitsTheGracePeriod(t *testing.T) {
	m := load(t)
	for _, d := range m.deployments {
		spec := d.Spec.Template.Spec
		main := spec.Containers[0]
		vars := env(t, m, d.Name, main)
		total := duration(t, d.Name, vars, "SHUTDOWN_TIMEOUT") + duration(t, d.Name, vars, "SHUTDOWN_DELAY")
		grace := 30 * time.Second // Kubernetes' default
		if spec.TerminationGracePeriodSeconds != nil {
			grace = time.Duration(*spec.TerminationGracePeriodSeconds) * time.Second
		}
		if grace < total+shutdownAfterDrain {
			t.Errorf("%s: grace period %s, but the role may take %s to stop", d.Name, grace, total+shutdownAfterDrain)
		}
		if roles[d.Name] == "api" {
			if duration(t, d.Name, vars, "SHUTDOWN_DELAY") == 0 {
				t.Errorf("%s: SHUTDOWN_DELAY unset: the api stops accepting before the Service stops sending it requests", d.Name)
			}
			if len(m.budgets) == 0 || !budgeted(t, m, d) {
				t.Errorf("%s: no PodDisruptionBudget", d.Name)
			}
		}
	}
	for _, s := range m.services {
		sel := labels.SelectorFromSet(s.Spec.Selector)
		n := 0
		for _, d := range m.deployments {
			if sel.Matches(labels.Set(d.Spec.Template.Labels)) {
				n++
				for _, p := range s.Spec.Ports {
					if !slices.ContainsFunc(d.Spec.Template.Spec.Containers[0].Ports, func(c corev1.ContainerPort) bool { return c.Name == p.TargetPort.String() }) {
						t.Errorf("Service %s: targetPort %s is not a port of %s", s.Name, p.TargetPort.String(), d.Name)
					}
				}
			}
		}
		if n != 1 {
			t.Errorf("Service %s selects the pods of %d Deployments, want 1", s.Name, n)
		}
	}
	for _, b := range m.budgets {
		if !slices.ContainsFunc(slices.Collect(maps.Values(m.deployments)), func(d *appsv1.Deployment) bool { return selects(t, b, d) }) {
			t.Errorf("PodDisruptionBudget %s selects no Deployment's pods", b.Name)
		}
	}
}

// TestScalerWatchesTheHandlers: KEDA scales the handler Deployment on the
// lag of exactly the streams and groups the handler role reads, at the
// Redis REDIS_URL names.
func TestScalerWatchesTheHandlers(t *testing.T) {
	m := load(t)
	handler := m.deployments["conveyor-handler"]
	if handler == nil {
		t.Fatal("no handler Deployment")
	}
	if handler.Spec.Replicas != nil {
		t.Error("conveyor-handler sets replicas: each kubectl apply would undo KEDA's scaling")
	}
	want := []string{}
	for _, p := range []struct{ stream, group string }{
		{events.TypeDocumentUploaded, handlers.DocumentGroup},
		{events.TypeEmailRequested, handlers.EmailGroup},
	} {
		want = append(want, p.stream+" "+p.group, bus.RetryStream(p.stream, p.group)+" "+p.group)
	}
	sort.Strings(want)
	redisURL := env(t, m, "conveyor-handler", handler.Spec.Template.Spec.Containers[0])["REDIS_URL"]
	u, err := url.Parse(redisURL)
	if err != nil || u.Scheme != "redis" {
		t.Fatalf("REDIS_URL %q: want a redis:// URL (%v)", redisURL, err)
	}
	db := strings.TrimPrefix(u.Path, "/")
	if db == "" {
		db = "0"
	}
	for _, s := range m.scalers {
		if s.Spec.ScaleTargetRef.Name != handler.Name || (s.Spec.ScaleTargetRef.Kind != "" && s.Spec.ScaleTargetRef.Kind != "Deployment") {
			t.Errorf("ScaledObject %s scales %s %q, want the Deployment %s", s.Name, s.Spec.ScaleTargetRef.Kind, s.Spec.ScaleTargetRef.Name, handler.Name)
		}
		// Replicas move their own group's due retries: with none, a retry
		// would wait unseen.
		if s.Spec.MinReplicaCount == nil || *s.Spec.MinReplicaCount < 1 {
			t.Errorf("ScaledObject %s may scale the handlers to zero", s.Name)
		}
		var got []string
		for i, tr := range s.Spec.Triggers {
			where := fmt.Sprintf("ScaledObject %s trigger %d", s.Name, i+1)
			if tr.Type != "redis-streams" {
				t.Errorf("%s: type %q", where, tr.Type)
				continue
			}
			for k := range tr.Metadata {
				if !slices.Contains(redisStreamsKeys, k) {
					t.Errorf("%s: %q is not a metadata key of KEDA's redis-streams scaler", where, k)
				}
			}
			md := tr.Metadata
			// lagCount (XINFO GROUPS) counts entries not yet delivered;
			// pendingEntriesCount is capped by each replica's in-flight window.
			if md["lagCount"] == "" || md["activationLagCount"] == "" {
				t.Errorf("%s: want lagCount with activationLagCount", where)
			}
			if md["address"] != u.Host || md["databaseIndex"] != db {
				t.Errorf("%s: watches %s db %q, but REDIS_URL is %s", where, md["address"], md["databaseIndex"], redisURL)
			}
			got = append(got, md["stream"]+" "+md["consumerGroup"])
		}
		sort.Strings(got)
		if !slices.Equal(got, want) {
			t.Errorf("ScaledObject %s watches\n%q\nwant\n%q", s.Name, got, want)
		}
	}
}

// memLimit parses a GOMEMLIMIT value as the Go runtime does: a number of
// bytes with an optional unit B, KiB, MiB, GiB or TiB.
func memLimit(s string) (int64, error) {
	units := []struct {
		suffix string
		scale  int64
	}{{"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}, {"B", 1}}
	scale := int64(1)
	for _, u := range units {
		if n, ok := strings.CutSuffix(s, u.suffix); ok {
			s, scale = n, u.scale
			break
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, err
	}
	return n * scale, nil
}

func defaultOf(t *testing.T, name string) string {
	t.Helper()
	for _, v := range config.Vars {
		if v.Name == name {
			return v.Default
		}
	}
	t.Fatalf("config.Vars has no %s", name)
	return ""
}

func duration(t *testing.T, where string, vars map[string]string, name string) time.Duration {
	t.Helper()
	s, ok := vars[name]
	if !ok {
		s = defaultOf(t, name)
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		t.Fatalf("%s: %s=%q: %v", where, name, s, err)
	}
	return d
}

// mountOf is the volume the file p is on in c, or "".
func mountOf(c corev1.Container, p string) string {
	best, name := "", ""
	for _, vm := range c.VolumeMounts {
		mp := strings.TrimSuffix(vm.MountPath, "/")
		if (p == mp || strings.HasPrefix(p, mp+"/")) && len(mp) > len(best) && !vm.ReadOnly {
			best, name = mp, vm.Name
		}
	}
	return name
}

func mounted(c corev1.Container, p string) bool { return mountOf(c, p) != "" }

func selects(t *testing.T, b *policyv1.PodDisruptionBudget, d *appsv1.Deployment) bool {
	t.Helper()
	sel, err := metav1.LabelSelectorAsSelector(b.Spec.Selector)
	if err != nil {
		t.Fatalf("PodDisruptionBudget %s: %v", b.Name, err)
	}
	return sel.Matches(labels.Set(d.Spec.Template.Labels))
}

func budgeted(t *testing.T, m manifests, d *appsv1.Deployment) bool {
	for _, b := range m.budgets {
		if selects(t, b, d) {
			return true
		}
	}
	return false
}
