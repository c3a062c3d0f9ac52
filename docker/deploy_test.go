// Package docker holds the container image definition; its tests check the
// Dockerfile and compose.yml with the real parsers of those formats, since
// no Docker engine runs where the tests do.
package docker_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/compose-spec/compose-go/v2/cli"
	"github.com/compose-spec/compose-go/v2/types"
	"github.com/moby/buildkit/frontend/dockerfile/parser"
)

func repoRoot(t *testing.T) string {
	t.Helper()
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	return root
}

func loadCompose(t *testing.T) *types.Project {
	t.Helper()
	root := repoRoot(t)
	opts, err := cli.NewProjectOptions([]string{filepath.Join(root, "compose.yml")},
		cli.WithWorkingDirectory(root), cli.WithName("conveyor"))
	if err != nil {
		t.Fatal(err)
	}
	p, err := opts.LoadProject(t.Context())
	if err != nil {
		t.Fatalf("compose's loader refuses compose.yml: %v", err)
	}
	return p
}

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		_ = os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// buildConveyor builds, once, the static binary the image ships:
// CGO_ENABLED=0, -trimpath, as docker/Dockerfile does.
func buildConveyor(t *testing.T) string {
	t.Helper()
	root := repoRoot(t)
	buildOnce.Do(func() {
		if binDir, buildErr = os.MkdirTemp("", "conveyor-static-"); buildErr != nil {
			return
		}
		cmd := exec.Command("go", "build", "-trimpath", "-o", filepath.Join(binDir, "conveyor"), "./cmd/conveyor")
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("CGO_ENABLED=0 go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return filepath.Join(binDir, "conveyor")
}

func TestComposeFile(t *testing.T) {
	t.Parallel()
	p := loadCompose(t)
	raw, err := os.ReadFile(filepath.Join(repoRoot(t), "compose.yml"))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(raw), "\nversion:") || strings.HasPrefix(string(raw), "version:") {
		t.Error("compose.yml has an obsolete top-level version: key")
	}

	want := []string{"api", "handler", "mailpit", "migrate", "postgres", "projector", "redis", "scheduler"}
	for _, name := range want {
		if _, err := p.GetService(name); err != nil {
			t.Errorf("service %s missing: %v", name, err)
		}
	}

	redis, _ := p.GetService("redis")
	cmd := strings.Join(redis.Command, " ")
	for _, flag := range []string{"--appendonly yes", "--maxmemory-policy noeviction"} {
		if !strings.Contains(cmd, flag) {
			t.Errorf("redis command %q lacks %s", cmd, flag)
		}
	}
	for _, name := range []string{"redis", "postgres"} {
		s, _ := p.GetService(name)
		if len(s.Ports) > 0 {
			t.Errorf("%s publishes ports %v; keep it private", name, s.Ports)
		}
		if s.HealthCheck == nil || s.HealthCheck.Disable || len(s.HealthCheck.Test) == 0 {
			t.Errorf("%s has no healthcheck", name)
		}
		if len(s.Volumes) == 0 || s.Volumes[0].Type != types.VolumeTypeVolume {
			t.Errorf("%s keeps its data in no named volume: %+v", name, s.Volumes)
		}
	}

	// The conveyor roles: dependencies, health checks, grace periods.
	shutdown := 20 * time.Second
	for _, name := range []string{"api", "handler", "projector", "scheduler"} {
		s, _ := p.GetService(name)
		if s.HealthCheck == nil || !slices.Contains(s.HealthCheck.Test, "healthcheck") {
			t.Errorf("%s healthcheck = %+v, want conveyor healthcheck", name, s.HealthCheck)
		}
		wantDeps := map[string]string{
			"migrate":  types.ServiceConditionCompletedSuccessfully,
			"redis":    types.ServiceConditionHealthy,
			"postgres": types.ServiceConditionHealthy,
		}
		for dep, cond := range wantDeps {
			if got := s.DependsOn[dep].Condition; got != cond {
				t.Errorf("%s depends_on %s: condition %q, want %q", name, dep, got, cond)
			}
		}
		// After SHUTDOWN_TIMEOUT, a role may still take about 10s: ending
		// its blocked reads, handing back, waiting for handlers that ignore
		// cancellation, releasing its consumer name.
		if s.StopGracePeriod == nil || time.Duration(*s.StopGracePeriod) < shutdown+15*time.Second {
			t.Errorf("%s stop_grace_period %v must be at least SHUTDOWN_TIMEOUT %s + 15s", name, s.StopGracePeriod, shutdown)
		}
		if s.Environment["SHUTDOWN_TIMEOUT"] == nil || *s.Environment["SHUTDOWN_TIMEOUT"] != shutdown.String() {
			t.Errorf("%s SHUTDOWN_TIMEOUT = %v, want %s", name, s.Environment["SHUTDOWN_TIMEOUT"], shutdown)
		}
	}
	migrate, _ := p.GetService("migrate")
	for dep, cond := range map[string]string{"redis": types.ServiceConditionHealthy, "postgres": types.ServiceConditionHealthy} {
		if got := migrate.DependsOn[dep].Condition; got != cond {
			t.Errorf("migrate depends_on %s: %q", dep, got)
		}
	}
	handler, _ := p.GetService("handler")
	for _, name := range []string{"handler", "scheduler"} {
		s, _ := p.GetService(name)
		if s.Deploy == nil || s.Deploy.Replicas == nil || *s.Deploy.Replicas != 2 {
			t.Errorf("%s replicas = %+v, want 2", name, s.Deploy)
		}
	}
	if handler.ContainerName != "" {
		t.Error("handler has a container_name, which prevents --scale")
	}
	if handler.Environment["CONSUMER_NAME"] != nil {
		t.Error("handler sets one CONSUMER_NAME for every replica; leave it to the per-replica default")
	}
	// Uploads are shared by the api and the handlers.
	api, _ := p.GetService("api")
	uploads := func(s types.ServiceConfig) string {
		for _, v := range s.Volumes {
			if v.Type == types.VolumeTypeVolume && v.Target == "/data/blobs" {
				return v.Source
			}
		}
		return ""
	}
	if uploads(api) == "" || uploads(api) != uploads(handler) {
		t.Errorf("api and handler do not share an uploads volume at /data/blobs: %q vs %q", uploads(api), uploads(handler))
	}
	if _, ok := p.Volumes[uploads(api)]; !ok {
		t.Errorf("volume %q is not declared", uploads(api))
	}
	if len(api.Ports) != 1 || api.Ports[0].Target != 8080 {
		t.Errorf("api ports = %+v, want 8080", api.Ports)
	}
	mailpit, _ := p.GetService("mailpit")
	if len(mailpit.Ports) != 1 || mailpit.Ports[0].Target != 8025 {
		t.Errorf("mailpit ports = %+v, want 8025", mailpit.Ports)
	}

	// Every conveyor subcommand compose runs exists in the binary.
	bin := buildConveyor(t)
	for _, s := range p.Services {
		if s.Image != "conveyor:local" {
			continue
		}
		args := append(slices.Clone(s.Command), "--help")
		ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
		out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
		cancel()
		if err != nil {
			t.Errorf("service %s runs `conveyor %s`, which does not exist: %v\n%s", s.Name, strings.Join(s.Command, " "), err, out)
		}
		if s.HealthCheck != nil && !s.HealthCheck.Disable && len(s.HealthCheck.Test) > 1 && strings.HasSuffix(s.HealthCheck.Test[1], "conveyor") {
			hc := append(slices.Clone(s.HealthCheck.Test[2:]), "--help")
			if out, err := exec.Command(bin, hc...).CombinedOutput(); err != nil {
				t.Errorf("service %s healthcheck `conveyor %s` does not exist: %v\n%s", s.Name, strings.Join(hc, " "), err, out)
			}
		}
	}
}

func TestDockerfile(t *testing.T) {
	t.Parallel()
	f, err := os.Open(filepath.Join(repoRoot(t), "docker", "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	res, err := parser.Parse(f)
	if err != nil {
		t.Fatalf("buildkit cannot parse docker/Dockerfile: %v", err)
	}
	type instr struct{ cmd, text string }
	var stages [][]instr
	for _, n := range res.AST.Children {
		cmd := strings.ToLower(n.Value)
		if cmd == "from" {
			stages = append(stages, nil)
		}
		if len(stages) == 0 {
			t.Fatalf("instruction before FROM: %s", n.Original)
		}
		stages[len(stages)-1] = append(stages[len(stages)-1], instr{cmd, n.Original})
	}
	if len(stages) < 2 {
		t.Fatalf("%d stage(s); want a multi-stage build", len(stages))
	}
	has := func(stage []instr, cmd, substr string) bool {
		for _, in := range stage {
			if in.cmd == cmd && strings.Contains(in.text, substr) {
				return true
			}
		}
		return false
	}
	build, final := stages[0], stages[len(stages)-1]
	// The build image's Go is go.mod's go line, exactly: a floating tag
	// builds with whatever release it names that day, and an older cached
	// one refuses the module (the golang images set GOTOOLCHAIN=local).
	gomod, err := os.ReadFile(filepath.Join(repoRoot(t), "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	goLine := regexp.MustCompile(`(?m)^go\s+(\S+)\s*$`).FindSubmatch(gomod)
	if goLine == nil {
		t.Fatal("go.mod has no go line")
	}
	from := strings.Fields(build[0].text)
	image := ""
	for _, f := range from[1:] {
		if !strings.HasPrefix(f, "--") {
			image = f
			break
		}
	}
	if want := "golang:" + string(goLine[1]) + "-"; !strings.HasPrefix(image, want) && image != strings.TrimSuffix(want, "-") {
		t.Errorf("build stage is FROM %s, want golang:%s (go.mod's go line), e.g. %sbookworm", image, goLine[1], want)
	}
	for _, want := range []string{"CGO_ENABLED=0", "-trimpath", "--mount=type=cache,target=/go/pkg/mod", "--mount=type=cache,target=/root/.cache/go-build", "./cmd/conveyor"} {
		if !has(build, "run", want) {
			t.Errorf("build stage RUN lacks %s", want)
		}
	}
	if !has(final, "from", "gcr.io/distroless/static") && !has(final, "from", "scratch") {
		t.Errorf("runtime stage is %q, want distroless/static or scratch", final[0].text)
	}
	// By number: Kubernetes refuses to start an image whose user is a name
	// under runAsNonRoot (it cannot check that the name is not root).
	if !has(final, "user", "65532:65532") {
		t.Error("runtime stage does not run as the non-root uid 65532 by number")
	}
	if !has(final, "healthcheck", "conveyor") || !has(final, "healthcheck", "healthcheck") {
		t.Error("runtime stage has no HEALTHCHECK running `conveyor healthcheck`")
	}
	if !has(final, "entrypoint", "conveyor") {
		t.Error("runtime stage ENTRYPOINT is not the conveyor binary")
	}
	if _, err := os.Stat(filepath.Join(repoRoot(t), ".dockerignore")); err != nil {
		t.Errorf("no .dockerignore: %v", err)
	}
}

// The binary built as the image builds it is static and runs.
func TestStaticBinary(t *testing.T) {
	t.Parallel()
	bin := buildConveyor(t)
	out, err := exec.Command(bin, "version").CombinedOutput()
	if err != nil || !strings.HasPrefix(string(out), "conveyor ") {
		t.Fatalf("conveyor version: %v %q", err, out)
	}
	ldd, err := exec.Command("ldd", bin).CombinedOutput()
	if !strings.Contains(string(ldd), "not a dynamic executable") && !strings.Contains(string(ldd), "statically linked") {
		t.Fatalf("ldd says the binary is dynamic (err %v):\n%s", err, ldd)
	}
}
