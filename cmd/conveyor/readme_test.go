package main_test

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/conveyor/conveyor/config"
	"github.com/conveyor/conveyor/internal/harness"
)

func readme(t *testing.T) (string, string) {
	t.Helper()
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(root, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	return string(b), root
}

// section returns the README text under a "## title" heading.
func section(t *testing.T, doc, title string) string {
	t.Helper()
	i := strings.Index(doc, "\n## "+title)
	if i < 0 {
		t.Fatalf("README has no section %q", title)
	}
	rest := doc[i+4+len(title):]
	if j := strings.Index(rest, "\n## "); j >= 0 {
		rest = rest[:j]
	}
	return rest
}

// The README's tables name every environment variable, every command and
// every task it mentions.
func TestReadmeIsComplete(t *testing.T) {
	t.Parallel()
	doc, root := readme(t)
	cfg := section(t, doc, "Configuration")
	for _, v := range config.Vars {
		if !strings.Contains(cfg, "| `"+v.Name+"` |") {
			t.Errorf("README's configuration table lacks %s", v.Name)
		}
	}
	out, err := exec.Command(harness.Binary(t), "help").CombinedOutput()
	if err != nil {
		t.Fatalf("conveyor help: %v", err)
	}
	cmds := section(t, doc, "Commands")
	for _, m := range regexp.MustCompile(`(?m)^  ([a-z]+)\s{2,}`).FindAllStringSubmatch(string(out), -1) {
		if !strings.Contains(cmds, "| `conveyor "+m[1]) {
			t.Errorf("README's command table lacks conveyor %s", m[1])
		}
	}
	var tf struct {
		Tasks map[string]any `yaml:"tasks"`
	}
	raw, err := os.ReadFile(filepath.Join(root, "Taskfile.yml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(raw, &tf); err != nil {
		t.Fatal(err)
	}
	for _, m := range regexp.MustCompile("go tool task ([a-z:]+)").FindAllStringSubmatch(doc, -1) {
		if _, ok := tf.Tasks[m[1]]; !ok {
			t.Errorf("README runs `go tool task %s`, which Taskfile.yml does not have", m[1])
		}
	}
	for _, want := range []string{"run", "up", "down", "logs", "test", "test:short", "lint", "bench", "chaos", "migrate"} {
		if _, ok := tf.Tasks[want]; !ok {
			t.Errorf("Taskfile.yml lacks the %s task", want)
		}
	}
	ci, err := os.ReadFile(filepath.Join(root, ".ci", "run"))
	if err != nil || !strings.Contains(string(ci), "go tool task test") || !strings.Contains(section(t, doc, "Quick start"), "go tool task test") {
		t.Errorf("README's test command and .ci/run disagree (%v)", err)
	}
}

// The curl lines of the README's walkthrough work against a real pipeline
// started as README says (conveyor up with nothing configured).
func TestReadmeWalkthrough(t *testing.T) {
	t.Parallel()
	doc, root := readme(t)
	data, err := os.MkdirTemp("", "conveyor-readme-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(data) })
	if err := os.Chmod(data, 0o755); err != nil {
		t.Fatal(err)
	}
	up := harness.Start(t, "up", []string{"CONVEYOR_DATA_DIR=" + data}, "up")
	up.WaitReady(t, 2*time.Minute)
	defer func() {
		if err := up.Stop(time.Minute); err != nil {
			t.Errorf("stop conveyor up: %v", err)
		}
	}()

	walk := section(t, doc, "Walkthrough with curl")
	ids := map[string]string{}
	ran := 0
	for _, line := range strings.Split(walk, "\n") {
		line = strings.TrimSpace(line)
		if !strings.HasPrefix(line, "curl ") {
			continue
		}
		cmdline := strings.ReplaceAll(line, "http://localhost:8080", up.URL())
		for k, v := range ids {
			cmdline = strings.ReplaceAll(cmdline, "<"+k+">", v)
		}
		if strings.Contains(cmdline, "<") {
			t.Fatalf("README line uses an id no earlier line produced: %s", line)
		}
		bodyFile := filepath.Join(t.TempDir(), "body")
		cmd := exec.Command("bash", "-c", cmdline+" -s -o "+bodyFile+" -w '%{http_code}'")
		cmd.Dir = root
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("%s: %v", line, err)
		}
		code := strings.TrimSpace(string(out))
		raw, _ := os.ReadFile(bodyFile)
		body := string(raw)
		if !strings.HasPrefix(code, "2") {
			t.Fatalf("%s\n→ %s %s", line, code, body)
		}
		var got map[string]any
		_ = json.Unmarshal([]byte(body), &got)
		for _, k := range []string{"doc_id", "email_id"} {
			if v, ok := got[k].(string); ok {
				if _, seen := ids[k]; !seen {
					ids[k] = v
				}
			}
		}
		ran++
	}
	if ran < 6 {
		t.Fatalf("ran %d curl lines of the walkthrough", ran)
	}
	// The walkthrough's `conveyor status`, run as README says: in a shell
	// where the export line that conveyor up printed was pasted first.
	m := regexp.MustCompile(`(?m)^  (export REDIS_URL=.*)$`).FindStringSubmatch(up.Log())
	if m == nil {
		t.Fatalf("conveyor up printed no export line naming REDIS_URL:\n%s", up.Log())
	}
	if !strings.Contains(walk, "export REDIS_URL=") {
		t.Errorf("README's walkthrough does not tell to paste the export line that conveyor up prints")
	}
	ranStatus := false
	for _, line := range strings.Split(walk, "\n") {
		line = strings.TrimSpace(line)
		if !strings.HasPrefix(line, "go run ./cmd/conveyor ") {
			continue
		}
		cmdline := strings.Replace(line, "go run ./cmd/conveyor", harness.Binary(t), 1)
		// Only the pasted line configures the command: no other
		// variable of the test's environment reaches it.
		cmd := exec.CommandContext(t.Context(), "bash", "-c", m[1]+"\n"+cmdline)
		cmd.Dir = root
		cmd.Env = []string{"LOG_FORMAT=text"}
		for _, k := range []string{"PATH", "HOME", "TMPDIR", "GORACE"} {
			if v, ok := os.LookupEnv(k); ok {
				cmd.Env = append(cmd.Env, k+"="+v)
			}
		}
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s (after %s): %v\n%s", line, m[1], err, out)
		}
		if strings.HasSuffix(line, " status") {
			if !strings.Contains(string(out), "document.uploaded") {
				t.Fatalf("%s shows no document.uploaded stream:\n%s", line, out)
			}
			ranStatus = true
		}
	}
	if !ranStatus {
		t.Fatal("README's walkthrough runs no `go run ./cmd/conveyor status`")
	}
}

// Every flag of every command appears in the README's command table.
func TestReadmeNamesEveryFlag(t *testing.T) {
	t.Parallel()
	doc, _ := readme(t)
	cmds := section(t, doc, "Commands")
	out, err := exec.Command(harness.Binary(t), "help").CombinedOutput()
	if err != nil {
		t.Fatalf("conveyor help: %v", err)
	}
	for _, m := range regexp.MustCompile(`(?m)^  ([a-z]+)\s{2,}`).FindAllStringSubmatch(string(out), -1) {
		help, _ := exec.Command(harness.Binary(t), m[1], "--help").CombinedOutput()
		for _, f := range regexp.MustCompile(`(?m)^  -([a-z-]+)`).FindAllStringSubmatch(string(help), -1) {
			if !strings.Contains(cmds, "--"+f[1]) {
				t.Errorf("README's command table lacks conveyor %s --%s", m[1], f[1])
			}
		}
	}
}
