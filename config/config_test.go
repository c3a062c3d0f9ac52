package config_test

import (
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"testing"
	"time"

	"github.com/conveyor/conveyor/config"
)

func env(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

func TestDefaults(t *testing.T) {
	t.Parallel()
	c, err := config.Load(env(map[string]string{"REDIS_URL": "redis://127.0.0.1:6379/0"}))
	if err != nil {
		t.Fatal(err)
	}
	if c.HTTPAddr != ":8080" || c.MaxUploadBytes != 32<<20 || c.CacheTTL != 60*time.Second {
		t.Fatalf("defaults wrong: %+v", c)
	}
	if c.CacheRedisURL != c.RedisURL {
		t.Fatalf("CACHE_REDIS_URL should default to REDIS_URL, got %q", c.CacheRedisURL)
	}
	if c.InboxRetention != 7*24*time.Hour {
		t.Fatalf("INBOX_RETENTION defaults to %s, want 168h", c.InboxRetention)
	}
}

// TestStuckAfter: STUCK_AFTER unset is 0 (the scheduler derives it from
// the retry policy), set is kept, and 0 is refused.
func TestStuckAfter(t *testing.T) {
	t.Parallel()
	for value, want := range map[string]time.Duration{"": 0, "5m": 5 * time.Minute} {
		c, err := config.Load(env(map[string]string{"REDIS_URL": "redis://127.0.0.1:6379/0", "STUCK_AFTER": value}))
		if err != nil || c.StuckAfter != want {
			t.Errorf("STUCK_AFTER=%q: %s, %v; want %s", value, c.StuckAfter, err, want)
		}
	}
	if _, err := config.Load(env(map[string]string{"REDIS_URL": "redis://127.0.0.1:6379/0", "STUCK_AFTER": "0s"})); err == nil || !strings.Contains(err.Error(), "STUCK_AFTER") {
		t.Errorf("STUCK_AFTER=0s: %v, want an error naming it", err)
	}
}

// TestUnixSocketURLs: Redis and PostgreSQL on Unix sockets are named as
// their clients take them; a URL that names neither host nor socket is
// refused.
func TestUnixSocketURLs(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		name, value string
		ok          bool
	}{
		{"REDIS_URL", "unix:///run/redis/redis.sock?db=1", true},
		{"REDIS_URL", "unix://", false},
		{"REDIS_URL", "redis://", false},
		{"DATABASE_URL", "postgres:///conveyor?host=/var/run/postgresql", true},
		{"DATABASE_URL", "postgres:///conveyor", false},
	} {
		vars := map[string]string{"REDIS_URL": "redis://127.0.0.1:6379/0", tt.name: tt.value}
		_, err := config.Load(env(vars))
		if ok := err == nil; ok != tt.ok {
			t.Errorf("%s=%s: %v, want accepted %v", tt.name, tt.value, err, tt.ok)
		}
	}
}

// TestInboxRetentionBounds: an inbox kept too briefly would let redeliveries
// apply twice, so a short INBOX_RETENTION is refused rather than honoured.
func TestInboxRetentionBounds(t *testing.T) {
	t.Parallel()
	for value, wantErr := range map[string]bool{"24h": false, "720h": false, "23h59m": true, "0s": true, "-1h": true, "week": true} {
		c, err := config.Load(env(map[string]string{"REDIS_URL": "redis://127.0.0.1:6379/0", "INBOX_RETENTION": value}))
		switch {
		case wantErr && (err == nil || !strings.Contains(err.Error(), "INBOX_RETENTION")):
			t.Errorf("INBOX_RETENTION=%s: err = %v, want an error naming it", value, err)
		case !wantErr && err != nil:
			t.Errorf("INBOX_RETENTION=%s: %v", value, err)
		case !wantErr && c.InboxRetention.String() != mustDuration(t, value).String():
			t.Errorf("INBOX_RETENTION=%s read as %s", value, c.InboxRetention)
		}
	}
}

func mustDuration(t *testing.T, s string) time.Duration {
	t.Helper()
	d, err := time.ParseDuration(s)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func TestEveryProblemReportedTogether(t *testing.T) {
	t.Parallel()
	_, err := config.Load(env(map[string]string{
		"REDIS_URL":        "http://x",
		"DATABASE_URL":     "postgres://",
		"MAX_UPLOAD_BYTES": "lots",
		"CACHE_TTL":        "forever",
		"LOG_LEVEL":        "loud",
		"LOG_FORMAT":       "xml",
		"SMTP_URL":         "ftp://mail",
	}))
	if err == nil {
		t.Fatal("expected errors")
	}
	for _, name := range []string{"REDIS_URL", "DATABASE_URL", "MAX_UPLOAD_BYTES", "CACHE_TTL", "LOG_LEVEL", "LOG_FORMAT", "SMTP_URL"} {
		if !strings.Contains(err.Error(), name) {
			t.Errorf("error does not name %s:\n%v", name, err)
		}
	}
}

func TestFileVariables(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	secret := filepath.Join(dir, "key")
	if err := os.WriteFile(secret, []byte("s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		env     map[string]string
		want    string
		wantErr string
	}{
		{name: "file", env: map[string]string{"SUMMARIZER_API_KEY_FILE": secret}, want: "s3cret"},
		{name: "both", env: map[string]string{"SUMMARIZER_API_KEY_FILE": secret, "SUMMARIZER_API_KEY": "x"}, wantErr: "set one"},
		{name: "missing file", env: map[string]string{"SUMMARIZER_API_KEY_FILE": filepath.Join(dir, "nope")}, wantErr: "SUMMARIZER_API_KEY_FILE"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			c, err := config.Load(env(tt.env))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want it to mention %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if c.SummarizerAPIKey != tt.want {
				t.Fatalf("got %q", c.SummarizerAPIKey)
			}
		})
	}
}

func TestRequire(t *testing.T) {
	t.Parallel()
	c, err := config.Load(env(nil))
	if err != nil {
		t.Fatal(err)
	}
	err = c.Require("REDIS_URL", "DATABASE_URL")
	if err == nil || !strings.Contains(err.Error(), "REDIS_URL") || !strings.Contains(err.Error(), "DATABASE_URL") {
		t.Fatalf("Require = %v", err)
	}
}

// TestLoadRequired: Load reports the required variables that are unset
// together with every other problem, and a variable whose file it could not
// read once, not also as unset.
func TestLoadRequired(t *testing.T) {
	t.Parallel()
	missing := filepath.Join(t.TempDir(), "missing")
	tests := []struct {
		name string
		env  map[string]string
		want []string
	}{
		{name: "none set", env: nil, want: []string{"REDIS_URL is required", "DATABASE_URL is required"}},
		{
			name: "with another problem", env: map[string]string{"LOG_LEVEL": "loud", "REDIS_URL": "redis://r:6379/0"},
			want: []string{`LOG_LEVEL: must be debug, info, warn or error, not "loud"`, "DATABASE_URL is required"},
		},
		{
			name: "file not readable", env: map[string]string{"REDIS_URL_FILE": missing},
			want: []string{"REDIS_URL_FILE: open " + missing + ": no such file or directory", "DATABASE_URL is required"},
		},
		{name: "all set", env: map[string]string{"REDIS_URL": "redis://r:6379/0", "DATABASE_URL": "postgres://db/x"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			_, err := config.Load(env(tt.env), "REDIS_URL", "DATABASE_URL")
			got := ""
			if err != nil {
				got = err.Error()
			}
			if want := strings.Join(tt.want, "\n"); got != want {
				t.Errorf("Load = %q, want %q", got, want)
			}
		})
	}
}

func TestVarsAreDocumented(t *testing.T) {
	t.Parallel()
	seen := map[string]bool{}
	for _, v := range config.Vars {
		if v.Help == "" || seen[v.Name] {
			t.Errorf("%s: missing help or listed twice", v.Name)
		}
		seen[v.Name] = true
	}
}

func TestTuneGC(t *testing.T) {
	old := debug.SetGCPercent(100)
	defer debug.SetGCPercent(old)
	if got := config.TuneGC(func(string) string { return "" }); !strings.Contains(got, "400") {
		t.Fatalf("TuneGC without GOGC = %q", got)
	}
	if p := debug.SetGCPercent(100); p != config.GCPercent {
		t.Fatalf("GC percent after TuneGC = %d, want %d", p, config.GCPercent)
	}
	if got := config.TuneGC(func(k string) string { return map[string]string{"GOGC": "50"}[k] }); got != "GOGC=50 (from the environment)" {
		t.Fatalf("TuneGC with GOGC=50 = %q", got)
	}
	if p := debug.SetGCPercent(100); p != 100 {
		t.Fatalf("TuneGC overrode GOGC from the environment: percent %d", p)
	}
}

// TestURLErrorsHideSecrets: a URL that does not parse (here a password
// with an unencoded '/' or '#', which url.Parse reads as the end of the
// host) or has no scheme is reported by name only. The parser's own error
// quotes the whole URL, password included, and configuration errors end up
// in logs.
func TestURLErrorsHideSecrets(t *testing.T) {
	t.Parallel()
	const password = "Zq9x/Kv7w#Rb4t"
	dir := t.TempDir()
	file := filepath.Join(dir, "database-url")
	if err := os.WriteFile(file, []byte("postgres://app:"+password+"@db:5432/conveyor\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		env  map[string]string
		bad  string // the variable the error must name
	}{
		{name: "redis", env: map[string]string{"REDIS_URL": "redis://:" + password + "@redis:6379/0"}, bad: "REDIS_URL"},
		{name: "cache redis", env: map[string]string{"REDIS_URL": "redis://redis:6379/0", "CACHE_REDIS_URL": "rediss://default:" + password + "@cache:6380/0"}, bad: "CACHE_REDIS_URL"},
		{name: "database", env: map[string]string{"DATABASE_URL": "postgres://app:" + password + "@db:5432/conveyor"}, bad: "DATABASE_URL"},
		{name: "database from a file", env: map[string]string{"DATABASE_URL_FILE": file}, bad: "DATABASE_URL"},
		{name: "database without scheme", env: map[string]string{"DATABASE_URL": "app:" + password + "@db:5432/conveyor"}, bad: "DATABASE_URL"},
		{name: "password first, without scheme", env: map[string]string{"REDIS_URL": password + ":x@redis:6379"}, bad: "REDIS_URL"},
		// A password pasted alone, with a ':' where the '/' is: url.Parse
		// takes what precedes the ':' for a scheme.
		{name: "bare password", env: map[string]string{"REDIS_URL": strings.ReplaceAll(password, "/", ":")}, bad: "REDIS_URL"},
		{name: "smtp", env: map[string]string{"SMTP_URL": "smtp://mailer:" + password + "@mail:587"}, bad: "SMTP_URL"},
		{name: "summarizer", env: map[string]string{"SUMMARIZER_URL": "https://user:" + password + "@llm.example/v1"}, bad: "SUMMARIZER_URL"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			_, err := config.Load(env(tt.env))
			if err == nil {
				t.Fatalf("Load accepted %v", tt.env)
			}
			msg := err.Error()
			if !strings.Contains(msg, tt.bad) {
				t.Errorf("error does not name %s: %s", tt.bad, msg)
			}
			// Neither the password nor any piece of it of three or more
			// characters.
			for i := 0; i < len(password); i++ {
				for j := i + 3; j <= len(password); j++ {
					if strings.Contains(msg, password[i:j]) {
						t.Fatalf("error shows %q, a piece of the password: %s", password[i:j], msg)
					}
				}
			}
		})
	}
}
