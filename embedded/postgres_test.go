package embedded

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// postgresDir returns a data folder that PostgreSQL can reach when the tests
// run as root (t.TempDir is private to root), removed at cleanup.
func postgresDir(t *testing.T) string {
	t.Helper()
	parent, err := os.MkdirTemp("", "embedded-postgres-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(parent) })
	if err := os.Chmod(parent, 0o755); err != nil {
		t.Fatal(err)
	}
	return filepath.Join(parent, "data")
}

func openDB(t *testing.T, url string) *sql.DB {
	t.Helper()
	db, err := sql.Open("postgres", url)
	if err != nil {
		t.Fatalf("open %s: %v", url, err)
	}
	t.Cleanup(func() { _ = db.Close() })
	return db
}

func countRows(t *testing.T, url string) int {
	t.Helper()
	db := openDB(t, url)
	var n int
	if err := db.QueryRowContext(t.Context(), "SELECT count(*) FROM items").Scan(&n); err != nil {
		t.Fatalf("count rows in %s: %v", url, err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	return n
}

func TestPostgresLifecycle(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	dir := postgresDir(t)
	// Fsync stays on: the data must survive Kill below.
	cfg := PostgresConfig{Dir: dir, Database: "app"}
	p, err := StartPostgres(ctx, cfg)
	if err != nil {
		t.Fatalf("StartPostgres: %v", err)
	}
	t.Cleanup(func() {
		if err := p.Stop(context.Background()); err != nil {
			t.Errorf("Stop: %v", err)
		}
	})
	if !strings.HasPrefix(p.URL(), "postgres://postgres@127.0.0.1:") || !strings.HasSuffix(p.URL(), "/app?sslmode=disable") {
		t.Errorf("URL() = %s", p.URL())
	}

	db := openDB(t, p.URL())
	if _, err := db.ExecContext(ctx, "CREATE TABLE items (id int PRIMARY KEY)"); err != nil {
		t.Fatalf("create table in the configured database: %v", err)
	}
	if _, err := db.ExecContext(ctx, "INSERT INTO items VALUES (1)"); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}

	t.Run("Unix socket URL", func(t *testing.T) {
		// The form README gives for DATABASE_URL on a socket.
		url := fmt.Sprintf("postgres:///app?host=%s&port=%d&user=postgres&sslmode=disable", p.sockDir, p.port)
		var one int
		if err := openDB(t, url).QueryRowContext(ctx, "SELECT 1").Scan(&one); err != nil || one != 1 {
			t.Fatalf("query over %s: %d, %v", url, one, err)
		}
	})

	t.Run("CreateDatabase", func(t *testing.T) {
		for range 2 { // the second call finds it and does nothing
			if err := p.CreateDatabase(ctx, "other-db"); err != nil {
				t.Fatalf("CreateDatabase: %v", err)
			}
		}
		var name string
		if err := openDB(t, p.URLFor("other-db")).QueryRowContext(ctx, "SELECT current_database()").Scan(&name); err != nil || name != "other-db" {
			t.Fatalf("current_database() = %q, %v; want other-db", name, err)
		}
	})

	t.Run("Stop and start again on the same folder", func(t *testing.T) {
		pid, url := p.PID(), p.URL()
		if err := p.Stop(ctx); err != nil {
			t.Fatalf("Stop: %v", err)
		}
		assertGone(t, pid)
		if err := p.Stop(ctx); err != nil {
			t.Errorf("second Stop: %v, want nil", err)
		}
		if _, err := os.Stat(filepath.Join(dir, "postmaster.pid")); !os.IsNotExist(err) {
			t.Errorf("postmaster.pid after a clean stop: %v, want it removed", err)
		}

		p, err = StartPostgres(ctx, cfg)
		if err != nil {
			t.Fatalf("StartPostgres on the same folder: %v", err)
		}
		if p.URL() != url {
			t.Errorf("URL() = %s, want the recorded %s", p.URL(), url)
		}
		if n := countRows(t, p.URL()); n != 1 {
			t.Errorf("rows after restart = %d, want 1", n)
		}
	})

	t.Run("Kill leaves a stale lock file and Restart recovers", func(t *testing.T) {
		pid := p.PID()
		if err := p.Kill(); err != nil {
			t.Fatalf("Kill: %v", err)
		}
		assertGone(t, pid)
		if _, err := os.Stat(filepath.Join(dir, "postmaster.pid")); err != nil {
			t.Fatalf("postmaster.pid after Kill: %v, want the stale file left behind", err)
		}
		if err := p.Restart(ctx); err != nil {
			t.Fatalf("Restart after Kill: %v", err)
		}
		if n := countRows(t, p.URL()); n != 1 {
			t.Errorf("rows after Kill and Restart = %d, want 1", n)
		}
		pid = p.PID()
		if err := p.Stop(ctx); err != nil {
			t.Fatalf("Stop: %v", err)
		}
		assertGone(t, pid)
	})
}

func TestPostgresFsyncOff(t *testing.T) {
	t.Parallel()
	p, err := StartPostgres(t.Context(), PostgresConfig{Dir: postgresDir(t), Fsync: off()})
	if err != nil {
		t.Fatalf("StartPostgres: %v", err)
	}
	t.Cleanup(func() {
		if err := p.Stop(context.Background()); err != nil {
			t.Errorf("Stop: %v", err)
		}
	})
	for setting, want := range map[string]string{"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off", "max_connections": "200"} {
		var got string
		if err := openDB(t, p.URL()).QueryRowContext(t.Context(), "SHOW "+setting).Scan(&got); err != nil || got != want {
			t.Errorf("SHOW %s = %q, %v; want %q", setting, got, err, want)
		}
	}
}

func TestPostgresUnreachableFolder(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("only root runs PostgreSQL as another user")
	}
	t.Parallel()
	private := t.TempDir() // mode 0700, owned by root
	if err := os.Chmod(private, 0o700); err != nil {
		t.Fatal(err)
	}
	_, err := StartPostgres(t.Context(), PostgresConfig{Dir: filepath.Join(private, "data")})
	t.Log(err)
	if err == nil || !strings.Contains(err.Error(), "cannot enter "+private) {
		t.Fatalf("StartPostgres under a private folder: %v, want an error naming %s", err, private)
	}
}

func TestRemoveStalePID(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name       string
		content    string
		wantRemove bool
	}{
		{name: "dead pid", content: "2147483646\n/data\n", wantRemove: true},
		{name: "garbage", content: "not a pid\n", wantRemove: true},
		// Where process names are known (Linux), a live pid that is not a
		// postgres was reused after a crash; elsewhere it is left to
		// PostgreSQL to judge.
		{name: "live non-postgres pid", content: "1\n", wantRemove: processName(1) != ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			path := filepath.Join(dir, "postmaster.pid")
			if err := os.WriteFile(path, []byte(tt.content), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := removeStalePID(path); err != nil {
				t.Fatalf("removeStalePID: %v", err)
			}
			_, err := os.Stat(path)
			if removed := os.IsNotExist(err); removed != tt.wantRemove {
				t.Errorf("removed = %v, want %v", removed, tt.wantRemove)
			}
		})
	}
}

// TestPostgresFirstStartInterrupted: a first start cancelled while initdb
// creates the cluster (Ctrl-C) leaves a folder no server starts from; the
// next start creates the cluster again instead of failing or waiting
// forever for a server that cannot come up. The half-created folder is
// moved aside, also when a version that wrote no marker left it
// (PG_VERSION, no control file).
func TestPostgresFirstStartInterrupted(t *testing.T) {
	t.Parallel()
	for _, marker := range []bool{true, false} {
		t.Run(fmt.Sprintf("marker=%v", marker), func(t *testing.T) {
			t.Parallel()
			dir := postgresDir(t)
			off := false
			cfg := PostgresConfig{Dir: dir, Database: "app", Fsync: &off}
			ctx, cancel := context.WithCancel(t.Context())
			go func() {
				// initdb writes PG_VERSION first, then spends seconds
				// building the cluster: cancel in between.
				deadline := time.Now().Add(time.Minute)
				for time.Now().Before(deadline) {
					if _, err := os.Stat(filepath.Join(dir, "PG_VERSION")); err == nil {
						break
					}
					time.Sleep(time.Millisecond)
				}
				cancel()
			}()
			if p, err := StartPostgres(ctx, cfg); err == nil {
				_ = p.Stop(context.Background())
				t.Fatal("StartPostgres cancelled during initdb succeeded")
			}
			if _, err := os.Stat(filepath.Join(dir, "PG_VERSION")); err != nil {
				t.Fatalf("no PG_VERSION after the interrupted initdb (%v): the test did not interrupt it half way", err)
			}
			if !marker {
				// As an older version left it: no marker, and initdb
				// killed before the control file.
				if err := os.Remove(initdbMarker(dir)); err != nil {
					t.Fatal(err)
				}
				if err := os.Remove(filepath.Join(dir, "global", "pg_control")); err != nil && !errors.Is(err, fs.ErrNotExist) {
					t.Fatal(err)
				}
			}

			ctx, cancel2 := context.WithTimeout(t.Context(), 2*time.Minute)
			defer cancel2()
			p, err := StartPostgres(ctx, cfg)
			if err != nil {
				t.Fatalf("StartPostgres after an interrupted first start: %v", err)
			}
			t.Cleanup(func() { _ = p.Stop(context.Background()) })
			var name string
			if err := openDB(t, p.URL()).QueryRowContext(ctx, "SELECT current_database()").Scan(&name); err != nil || name != "app" {
				t.Errorf("current_database() = %q, %v; want app", name, err)
			}
			// Moved aside, never removed.
			if aside, _ := filepath.Glob(dir + ".broken-*"); len(aside) != 1 {
				t.Errorf("folders moved aside: %v, want the half-created one", aside)
			}
		})
	}
}

// TestPickPostgres: a cluster runs on the install of its own major
// version when there is one, even with a newer one beside it or another
// on PATH; without a cluster, the one on PATH, else the newest.
func TestPickPostgres(t *testing.T) {
	t.Parallel()
	installs := []string{"/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin", "/opt/homebrew/opt/postgresql@14/bin"}
	for _, tt := range []struct {
		candidates []string
		onPath     string
		want       int
		pick       string
	}{
		{installs, "", 15, "/usr/lib/postgresql/15/bin"},
		{installs, "", 14, "/opt/homebrew/opt/postgresql@14/bin"},
		{installs, "", 0, "/usr/lib/postgresql/16/bin"},
		{installs, "/usr/local/bin", 15, "/usr/lib/postgresql/15/bin"},
		{installs, "/usr/local/bin", 0, "/usr/local/bin"},
		{installs, "/usr/lib/postgresql/16/bin", 16, "/usr/lib/postgresql/16/bin"},
		{installs, "", 13, "/usr/lib/postgresql/16/bin"}, // none of its version: the newest, whose error says why
		{nil, "", 15, ""},
	} {
		if got := pickPostgres(tt.candidates, tt.onPath, tt.want); got != tt.pick {
			t.Errorf("pickPostgres(%v, %q, %d) = %q, want %q", tt.candidates, tt.onPath, tt.want, got, tt.pick)
		}
	}
}

// TestPostgresRefusesAFolderOfOtherFiles: a data folder that holds other
// files and no cluster is refused, and its files stay, start after start.
func TestPostgresRefusesAFolderOfOtherFiles(t *testing.T) {
	t.Parallel()
	dir := postgresDir(t)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	notes := filepath.Join(dir, "my-notes.sql")
	if err := os.WriteFile(notes, []byte("SELECT 1;"), 0o644); err != nil {
		t.Fatal(err)
	}
	off := false
	for range 2 {
		if p, err := StartPostgres(t.Context(), PostgresConfig{Dir: dir, Fsync: &off}); err == nil {
			_ = p.Stop(context.Background())
			t.Fatal("StartPostgres in a folder of other files succeeded")
		} else if !strings.Contains(err.Error(), "not empty") {
			t.Errorf("StartPostgres in a folder of other files: %v, want it to say the folder is not empty", err)
		}
		if _, err := os.Stat(notes); err != nil {
			t.Fatalf("the folder's file is gone: %v", err)
		}
	}
}
