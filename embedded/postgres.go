package embedded

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/lib/pq"
)

const (
	// postgresLogFile is the file in the data folder that receives the
	// server's output.
	postgresLogFile = "postgres.log"

	// maxSocketPath is the longest path of a Unix socket that every
	// supported system accepts (sun_path is 108 bytes on Linux, 104 on
	// macOS, both counting the final NUL).
	maxSocketPath = 103

	// probeTimeout bounds one readiness probe, so that a connection attempt
	// stuck on a server that is still starting does not delay the next one.
	probeTimeout = 5 * time.Second

	// cleanupStopTimeout bounds the graceful stop of a server that started
	// but could not be set up, before it is killed.
	cleanupStopTimeout = 30 * time.Second
)

// PostgresConfig configures [StartPostgres].
type PostgresConfig struct {
	// Dir is the data folder (PGDATA). initdb runs only if Dir/PG_VERSION is
	// missing, so a second start reuses the data. The log and the port of
	// the last run live there too. Required.
	Dir string

	// Port is the TCP port on 127.0.0.1. Zero reuses the port recorded in
	// Dir by a previous run if it is free, and otherwise picks a free port.
	Port int

	// Database is created if missing and named by URL. Defaults to
	// "conveyor".
	Database string

	// User is the name of the database superuser. Every connection from
	// 127.0.0.1 or the Unix socket is trusted, without a password. Defaults
	// to "postgres".
	User string

	// BinDir is the folder holding initdb and postgres. Defaults to the
	// folder of the postgres found on PATH (after resolving symlinks), else
	// the newest /usr/lib/postgresql/*/bin (Debian and Ubuntu do not put
	// them on PATH), else the newest Homebrew postgresql@* keg.
	BinDir string

	// Logger receives notices such as an unexpected exit of the server.
	// Defaults to a logger that discards everything.
	Logger *slog.Logger

	// Fsync makes commits durable. Defaults to true. False sets fsync,
	// synchronous_commit and full_page_writes off, which makes tests much
	// faster but loses the last commits (up to about a second) if the server
	// is killed, not only if the machine crashes: keep it on in tests that
	// kill PostgreSQL and then count rows.
	Fsync *bool

	// restart says how a server that died is restarted; tests shorten it.
	restart restartPolicy
}

func (c *PostgresConfig) setDefaults() {
	if c.Database == "" {
		c.Database = "conveyor"
	}
	if c.User == "" {
		c.User = "postgres"
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Fsync == nil {
		on := true
		c.Fsync = &on
	}
}

// Validate reports every problem of the configuration at once.
func (c PostgresConfig) Validate() error {
	var errs []error
	if c.Dir == "" {
		errs = append(errs, errors.New("postgres: Dir is required"))
	}
	if c.Port < 0 || c.Port > 65535 {
		errs = append(errs, fmt.Errorf("postgres: Port %d is not in 0..65535", c.Port))
	}
	if strings.ContainsRune(c.Database, 0) {
		errs = append(errs, errors.New("postgres: Database must not contain NUL"))
	}
	if strings.ContainsRune(c.User, 0) {
		errs = append(errs, errors.New("postgres: User must not contain NUL"))
	}
	return errors.Join(errs...)
}

// Postgres is a PostgreSQL server started by [StartPostgres]. Its methods
// are safe for concurrent use.
type Postgres struct {
	cfg     PostgresConfig
	binDir  string
	dir     string
	sockDir string
	port    int
	// runAs is the user the server runs as when we are root, which
	// PostgreSQL refuses to run as; nil otherwise.
	runAs *syscall.Credential

	sup *supervisor
}

// StartPostgres initialises cfg.Dir if it holds no cluster yet, starts the
// postmaster, waits until it answers `SELECT 1` over TCP, and creates
// cfg.Database if it is missing. ctx bounds the start only: the server runs
// until Stop or Kill, and is restarted if it dies meanwhile (see
// [Postgres.Failed]).
//
// The data folder is locked while the server runs, through the file
// .NAME.lock beside it (PGDATA itself must be empty for initdb): an error
// wraps [ErrInUse] if another server holds it.
//
// When the current user is root, initdb and postgres run as the system user
// "postgres" (or "nobody" if there is none), which must be able to enter
// every parent folder of cfg.Dir; the error says so if it cannot, rather
// than opening up someone's home folder.
//
// An error wraps [ErrNotInstalled] if initdb or postgres cannot be found,
// and quotes the server's output if it exited while starting.
func StartPostgres(ctx context.Context, cfg PostgresConfig) (*Postgres, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("start postgres: %w", err)
	}
	dir, err := filepath.Abs(cfg.Dir)
	if err != nil {
		return nil, fmt.Errorf("start postgres: %w", err)
	}
	binDir, err := findPostgresBinDir(cfg.BinDir, clusterVersion(dir))
	if err != nil {
		return nil, fmt.Errorf("start postgres: %w", err)
	}
	p := &Postgres{cfg: cfg, binDir: binDir, dir: dir}
	p.sup = &supervisor{
		name:     "postgres",
		logger:   cfg.Logger,
		policy:   cfg.restart,
		lockPath: postgresLockPath(dir),
		lockWhat: "postgres data folder " + dir,
		start:    p.start,
	}
	p.sup.policy.setDefaults()
	if err := mkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return nil, fmt.Errorf("start postgres: create data folder: %w", err)
	}
	// Locked before anything else: a second start must neither move
	// aside nor initialise a folder that the first is creating, nor
	// start a server on it.
	lock, err := lockDir(ctx, p.sup.lockPath, p.sup.lockWhat)
	if err != nil {
		return nil, fmt.Errorf("start postgres: %w", err)
	}
	proc, err := p.startFirst(ctx, lock)
	if err != nil {
		return nil, errors.Join(fmt.Errorf("start postgres: %w", err), lock.release())
	}
	p.sup.begin(proc, lock)
	if err := p.CreateDatabase(ctx, cfg.Database); err != nil {
		stopCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupStopTimeout)
		defer cancel()
		return nil, errors.Join(fmt.Errorf("start postgres: %w", err), p.Stop(stopCtx))
	}
	cfg.Logger.Info("postgres started", "addr", net.JoinHostPort("127.0.0.1", strconv.Itoa(p.port)), "pid", proc.pid(), "dir", dir)
	return p, nil
}

// postgresLockPath returns the lock file of the data folder dir: beside
// it, like the initdb marker, because initdb wants an empty folder.
func postgresLockPath(dir string) string {
	return filepath.Join(filepath.Dir(dir), "."+filepath.Base(dir)+".lock")
}

// startFirst prepares the data folder (creating the cluster if needed),
// chooses the port, starts the server and records the port.
func (p *Postgres) startFirst(ctx context.Context, lock *dirLock) (*process, error) {
	if err := setAsideHalfCreated(p.dir, p.cfg.Logger); err != nil {
		return nil, err
	}
	if os.Geteuid() == 0 {
		var err error
		if p.runAs, err = prepareRootDir(p.dir); err != nil {
			return nil, err
		}
	} else if err := mkdirAll(p.dir, 0o700); err != nil {
		return nil, fmt.Errorf("create data folder: %w", err)
	}
	if _, err := os.Stat(filepath.Join(p.dir, "PG_VERSION")); errors.Is(err, fs.ErrNotExist) {
		if err := p.createCluster(ctx); err != nil {
			return nil, err
		}
	} else if err != nil {
		return nil, err
	}

	p.sockDir = p.dir
	if len(p.dir)+len("/.s.PGSQL.65535") > maxSocketPath {
		// We connect over TCP; the socket is only a convenience for psql.
		p.sockDir = ""
		p.cfg.Logger.Warn("postgres data folder path too long for a Unix socket; listening on TCP only", "dir", p.dir)
	}
	port, pinned, err := choosePort(p.dir, p.cfg.Port, p.cfg.Logger, "postgres")
	if err != nil {
		return nil, err
	}
	var proc *process
	for attempt := 1; ; attempt++ {
		p.port = port
		proc, err = p.start(ctx, lock)
		if err == nil {
			break
		}
		if pinned || attempt == portAttempts || !errors.Is(err, errPortInUse) {
			return nil, err
		}
		if port, err = freePort(); err != nil {
			return nil, err
		}
	}
	if err := recordPort(p.dir, p.port); err != nil {
		return nil, errors.Join(err, proc.kill())
	}
	return proc, nil
}

// findPostgresBinDir returns binDir if it is set, else the folder of the
// newest PostgreSQL found, checking that it holds initdb and postgres.
// clusterVersion returns the major version of the cluster in dir, from
// its PG_VERSION, or 0 if there is none.
func clusterVersion(dir string) int {
	b, err := os.ReadFile(filepath.Join(dir, "PG_VERSION"))
	if err != nil {
		return 0
	}
	v, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return v
}

// findPostgresBinDir returns binDir if set, else the install folder of
// PostgreSQL major version want if there is one (a cluster runs only on
// its own major version: after an upgrade installs a newer one beside
// it, the cluster keeps its own), else the default one.
func findPostgresBinDir(binDir string, want int) (string, error) {
	if binDir == "" {
		binDir = defaultPostgresBinDir(want)
	}
	if binDir == "" {
		return "", fmt.Errorf("%w: postgres was not found on PATH or in /usr/lib/postgresql/*/bin; %s", ErrNotInstalled, postgresInstallHint)
	}
	for _, name := range []string{"postgres", "initdb"} {
		if _, err := findBinary(filepath.Join(binDir, name), postgresInstallHint); err != nil {
			return "", err
		}
	}
	return binDir, nil
}

// versionInPath finds the major version in an install folder such as
// /usr/lib/postgresql/15/bin or /opt/homebrew/opt/postgresql@16/bin.
var versionInPath = regexp.MustCompile(`postgresql[@/](\d+)`)

// defaultPostgresBinDir returns the install folder of major version want
// (if not 0) in the usual install folders, else the folder of the postgres
// on PATH, else that of the newest version in the usual install folders,
// else "".
func defaultPostgresBinDir(want int) string {
	candidates := installedPostgres()
	onPath := ""
	if path, err := exec.LookPath("postgres"); err == nil {
		// Resolve links such as /usr/local/bin/postgres, so that initdb is
		// looked for next to the real binary.
		if real, err := filepath.EvalSymlinks(path); err == nil {
			path = real
		}
		onPath = filepath.Dir(path)
	}
	return pickPostgres(candidates, onPath, want)
}

// pickPostgres chooses among install folders (see defaultPostgresBinDir).
func pickPostgres(candidates []string, onPath string, want int) string {
	version := func(path string) int {
		m := versionInPath.FindStringSubmatch(path)
		if m == nil {
			return 0
		}
		v, _ := strconv.Atoi(m[1]) // \d+ always parses, barring overflow
		return v
	}
	if want > 0 {
		if version(onPath) == want {
			return onPath
		}
		for _, c := range candidates {
			if version(c) == want {
				return c
			}
		}
	}
	if onPath != "" {
		return onPath
	}
	if len(candidates) == 0 {
		return ""
	}
	return slices.MaxFunc(candidates, func(a, b string) int { return version(a) - version(b) })
}

// installedPostgres lists the install folders of PostgreSQL versions in
// the usual places.
func installedPostgres() []string {
	var candidates []string
	for _, pattern := range []string{
		"/usr/lib/postgresql/*/bin",          // Debian, Ubuntu
		"/opt/homebrew/opt/postgresql@*/bin", // Homebrew on Apple silicon (keg-only)
		"/usr/local/opt/postgresql@*/bin",    // Homebrew on Intel
		"/home/linuxbrew/.linuxbrew/opt/postgresql@*/bin",
	} {
		matches, _ := filepath.Glob(pattern) // the patterns are valid
		for _, m := range matches {
			if _, err := os.Stat(filepath.Join(m, "postgres")); err == nil {
				candidates = append(candidates, m)
			}
		}
	}
	return candidates
}

// prepareRootDir picks the unprivileged user that runs PostgreSQL for
// root, creates dir owned by that user, and checks that the user can reach
// it.
func prepareRootDir(dir string) (*syscall.Credential, error) {
	u, err := user.Lookup("postgres")
	if err != nil {
		if u, err = user.Lookup("nobody"); err != nil {
			return nil, errors.New("running as root, but there is neither a postgres nor a nobody user to run PostgreSQL as (it refuses to run as root)")
		}
	}
	cred, err := credential(u)
	if err != nil {
		return nil, err
	}
	if err := mkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create data folder: %w", err)
	}
	if err := checkReachable(dir, u.Username, cred); err != nil {
		return nil, err
	}
	// A folder that already holds a cluster keeps its owner: PostgreSQL
	// checks it and says clearly if it is wrong. A new one must belong to
	// the user that initdb runs as.
	if _, err := os.Stat(filepath.Join(dir, "PG_VERSION")); errors.Is(err, fs.ErrNotExist) {
		if err := os.Chown(dir, int(cred.Uid), int(cred.Gid)); err != nil {
			return nil, fmt.Errorf("give data folder to user %s: %w", u.Username, err)
		}
	}
	return cred, nil
}

// credential converts u to the credential of a child process, with all of
// u's groups.
func credential(u *user.User) (*syscall.Credential, error) {
	uid, err := strconv.ParseUint(u.Uid, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("user %s: uid %q: %w", u.Username, u.Uid, err)
	}
	gid, err := strconv.ParseUint(u.Gid, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("user %s: gid %q: %w", u.Username, u.Gid, err)
	}
	cred := &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	if ids, err := u.GroupIds(); err == nil {
		for _, id := range ids {
			if g, err := strconv.ParseUint(id, 10, 32); err == nil {
				cred.Groups = append(cred.Groups, uint32(g))
			}
		}
	}
	return cred, nil
}

// checkReachable checks that the user described by cred may enter every
// parent folder of dir (the execute bit that applies to it). It looks at
// the mode bits only, which is what decides on a default system.
func checkReachable(dir, username string, cred *syscall.Credential) error {
	for p := filepath.Dir(dir); ; p = filepath.Dir(p) {
		fi, err := os.Stat(p)
		if err != nil {
			return err
		}
		st, ok := fi.Sys().(*syscall.Stat_t)
		if !ok {
			return nil // not a Unix file system; let PostgreSQL find out
		}
		mode := fi.Mode().Perm()
		var enter bool
		switch {
		case uint32(st.Uid) == cred.Uid:
			enter = mode&0o100 != 0
		case uint32(st.Gid) == cred.Gid || slices.Contains(cred.Groups, uint32(st.Gid)):
			enter = mode&0o010 != 0
		default:
			enter = mode&0o001 != 0
		}
		if !enter {
			return fmt.Errorf("PostgreSQL runs as user %s because we are root, and that user cannot enter %s (mode %#o): "+
				"choose a data folder it can reach (for example under /tmp, or a project folder outside a private home), "+
				"or allow it with `chmod o+x %s`", username, p, mode, p)
		}
		if p == filepath.Dir(p) {
			return nil
		}
	}
}

// setAsideHalfCreated moves aside the data folder dir if it holds a
// half-created cluster, so that it is made again. initdb killed half way
// (Ctrl-C during a first start) leaves a folder with PG_VERSION that no
// server can start from, and cannot clean up after itself. Such a folder
// has the marker (see createCluster) or, if an older version left it,
// PG_VERSION without the control file. It is moved aside, never removed.
func setAsideHalfCreated(dir string, log *slog.Logger) error {
	marker := initdbMarker(dir)
	_, err := os.Stat(marker)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if err != nil && !halfCreated(dir) {
		return nil
	}
	if _, err := os.Stat(dir); err == nil {
		aside := fmt.Sprintf("%s.broken-%d", dir, time.Now().Unix())
		log.Warn("postgres data folder holds a half-created cluster (its creation was interrupted); moving it aside and creating the cluster again", "dir", dir, "moved_to", aside)
		if err := os.Rename(dir, aside); err != nil {
			return fmt.Errorf("move the half-created cluster aside: %w", err)
		}
	}
	if err := os.Remove(marker); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

// createCluster runs initdb in the empty data folder. The marker beside
// it, written first, stays only if initdb is stopped half way (on any
// other failure initdb empties the folder itself), so that the next start
// knows the folder for a half-created one.
func (p *Postgres) createCluster(ctx context.Context) error {
	// initdb refuses a folder with anything in it; say so before the
	// marker, which must only ever name a folder initdb filled.
	if entries, err := os.ReadDir(p.dir); err != nil {
		return err
	} else if len(entries) > 0 {
		return fmt.Errorf("data folder %s holds no PostgreSQL cluster and is not empty (%s, ...): empty it or choose another", p.dir, entries[0].Name())
	}
	marker := initdbMarker(p.dir)
	marked := true
	if err := os.WriteFile(marker, nil, 0o600); err != nil {
		marked = false
		p.cfg.Logger.Warn("cannot mark the cluster as being created; if this first start is interrupted, remove the data folder before the next", "dir", p.dir, "error", err)
	}
	if err := p.initdb(ctx); err != nil {
		if ctx.Err() == nil && marked {
			_ = os.Remove(marker) // initdb emptied the folder
		}
		return err
	}
	if marked {
		return os.Remove(marker)
	}
	return nil
}

// halfCreated reports whether dir has PG_VERSION but no global/pg_control:
// an initdb killed before it wrote the control file.
func halfCreated(dir string) bool {
	if _, err := os.Stat(filepath.Join(dir, "PG_VERSION")); err != nil {
		return false
	}
	_, err := os.Stat(filepath.Join(dir, "global", "pg_control"))
	return errors.Is(err, fs.ErrNotExist)
}

// initdbMarker is the file beside the data folder dir that exists while
// initdb creates a cluster in it.
func initdbMarker(dir string) string {
	return filepath.Join(filepath.Dir(dir), "."+filepath.Base(dir)+".initdb-incomplete")
}

// initdb creates a new cluster in p.dir.
func (p *Postgres) initdb(ctx context.Context) error {
	cmd := exec.CommandContext(ctx, filepath.Join(p.binDir, "initdb"),
		"-D", p.dir,
		"-U", p.cfg.User,
		"--auth=trust",
		"-E", "UTF8",
		// The C locale exists everywhere; the host's LANG may name a locale
		// that is not installed, which makes initdb fail.
		"--locale=C",
		"--no-instructions",
	)
	cmd.Dir = p.dir
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = sysProcAttr(syscall.SIGKILL, p.runAs)
	// initdb runs postgres in bootstrap mode as its child: on cancel, kill
	// them both.
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = time.Second
	if err := cmd.Run(); err != nil {
		tail := strings.TrimSpace(out.String())
		if len(tail) > tailBytes {
			tail = tail[len(tail)-tailBytes:]
		}
		return fmt.Errorf("initdb %s: %w\n%s", p.dir, err, tail)
	}
	p.cfg.Logger.Info("postgres cluster created", "dir", p.dir)
	return nil
}

// start removes stale lock files, runs the postmaster on p.port and waits
// until it answers.
//
// Right after a kill -9, what the killed server left may still be in use
// for a moment: its shared memory, by its processes exiting on a busy
// machine, which the new postmaster refuses to share; or its lock files
// (postmaster.pid, the socket's), by a postmaster still shutting down. The
// start is tried again for a few seconds.
func (p *Postgres) start(ctx context.Context, lock *dirLock) (*process, error) {
	deadline := time.Now().Add(leftoverWait)
	for {
		proc, err := p.startOnce(ctx, lock)
		if (!errors.Is(err, errShmInUse) && !errors.Is(err, errPIDFileInUse)) || time.Now().After(deadline) {
			return proc, err
		}
		select {
		case <-ctx.Done():
			return nil, err
		case <-time.After(pollInterval):
		}
	}
}

// leftoverWait bounds how long start waits for what a killed server left.
const leftoverWait = 10 * time.Second

func (p *Postgres) startOnce(ctx context.Context, lock *dirLock) (*process, error) {
	if err := removeStaleLocks(p.dir, p.sockDir, p.port); err != nil {
		return nil, err
	}
	args := []string{
		"-D", p.dir,
		"-p", strconv.Itoa(p.port),
		"-k", p.sockDir,
		"-c", "listen_addresses=127.0.0.1",
		"-c", "max_connections=200",
	}
	if !*p.cfg.Fsync {
		args = append(args, "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off")
	}
	// The postmaster is our direct child, not started through pg_ctl, so
	// that we own its pid: we reap it and can signal it.
	cmd := exec.Command(filepath.Join(p.binDir, "postgres"), args...)
	cmd.Dir = p.dir
	out, err := newOutput(filepath.Join(p.dir, postgresLogFile), nil, nil)
	if err != nil {
		return nil, err
	}
	// SIGINT is PostgreSQL's fast shutdown: roll back open transactions,
	// checkpoint and exit, without waiting for clients to disconnect.
	proc, err := startProcess("postgres", cmd, out, syscall.SIGINT, p.runAs, lock, p.cfg.Logger)
	if err != nil {
		return nil, err
	}
	if err := proc.waitReady(ctx, p.port, p.probe); err != nil {
		return nil, err
	}
	return proc, nil
}

// removeStaleLocks removes the lock files of a postmaster that is gone:
// postmaster.pid in dir and, unless sockDir is "", the lock file of the
// socket for port in sockDir. A postmaster killed with SIGKILL leaves both
// behind, and PostgreSQL would refuse to start if the pid in them had been
// reused by a live process meanwhile, or named a zombie.
func removeStaleLocks(dir, sockDir string, port int) error {
	if err := removeStalePID(filepath.Join(dir, "postmaster.pid")); err != nil {
		return err
	}
	if sockDir == "" {
		return nil
	}
	return removeStalePID(filepath.Join(sockDir, ".s.PGSQL."+strconv.Itoa(port)+".lock"))
}

// removeStalePID removes the PostgreSQL lock file path if the process it
// names is gone (or a zombie). A file naming a live postgres is left for
// PostgreSQL to judge.
func removeStalePID(path string) error {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read lock file: %w", err)
	}
	first, _, _ := strings.Cut(string(b), "\n")
	if pid, err := strconv.Atoi(strings.TrimSpace(first)); err == nil && pid > 0 && pidAlive(pid) {
		if name := processName(pid); name == "" || name == "postgres" {
			return nil
		}
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove stale lock file: %w", err)
	}
	return nil
}

// probe runs SELECT 1 over TCP in the postgres database, which always
// exists (cfg.Database may not exist yet).
func (p *Postgres) probe(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()
	db, err := sql.Open("postgres", p.URLFor("postgres"))
	if err != nil {
		return err
	}
	var one int
	err = db.QueryRowContext(ctx, "SELECT 1").Scan(&one)
	return errors.Join(err, db.Close())
}

// URL returns the URL of cfg.Database,
// postgres://USER@127.0.0.1:PORT/DB?sslmode=disable.
func (p *Postgres) URL() string { return p.URLFor(p.cfg.Database) }

// URLFor returns the URL of another database on the same server.
func (p *Postgres) URLFor(database string) string {
	u := url.URL{
		Scheme:   "postgres",
		User:     url.User(p.cfg.User),
		Host:     net.JoinHostPort("127.0.0.1", strconv.Itoa(p.port)),
		Path:     "/" + database,
		RawQuery: "sslmode=disable",
	}
	return u.String()
}

// PID returns the process id of the postmaster started last. It keeps its
// value after Stop and Kill, so that a caller can check the process is gone.
func (p *Postgres) PID() int { return p.sup.pid() }

// Failed returns a channel that is closed when the server has died and
// could not be restarted; Err then says why. A postmaster that dies
// without Stop or Kill is restarted on the same port and data (after crash
// recovery), with a growing delay, and each restart is logged; only when
// several restarts in a row fail, or die soon after starting, does it stay
// down. A caller that cannot work without the server, such as `conveyor
// up`, should stop when the channel is closed. Stop and Kill do not close
// it; after it is closed, a successful Restart replaces it.
func (p *Postgres) Failed() <-chan struct{} { return p.sup.failedChan() }

// Err returns why the server is down for good, wrapping [ErrDown], once
// Failed is closed, and nil before.
func (p *Postgres) Err() error { return p.sup.failErr() }

// Stop shuts the server down with a fast shutdown (SIGINT to the
// postmaster: open transactions are rolled back, committed data is
// checkpointed) and waits for the postmaster and all its processes to
// exit. If ctx ends first, the server is killed and the error wraps
// ctx.Err(). Stop releases the data folder. Stopping a server that is not
// running does nothing.
func (p *Postgres) Stop(ctx context.Context) error {
	if err := p.sup.stop(ctx); err != nil {
		return fmt.Errorf("postgres on port %d: %w", p.port, err)
	}
	return nil
}

// Kill sends SIGKILL to the postmaster and all its processes and waits
// until they are gone, the way a crash would end them, but it is not
// restarted. Committed data survives (see PostgresConfig.Fsync); the next
// start runs crash recovery. Kill releases the data folder.
func (p *Postgres) Kill() error {
	if err := p.sup.kill(); err != nil {
		return fmt.Errorf("postgres on port %d: %w", p.port, err)
	}
	return nil
}

// Restart starts the server again on the same port and data folder, after
// Stop or Kill (a running server is stopped first), and returns once it
// answers, which after a Kill is when crash recovery is done.
func (p *Postgres) Restart(ctx context.Context) error {
	proc, err := p.sup.restart(ctx)
	if err != nil {
		return fmt.Errorf("restart postgres: %w", err)
	}
	p.cfg.Logger.Info("postgres restarted", "port", p.port, "pid", proc.pid())
	return nil
}

// CreateDatabase creates the database name unless it exists. Concurrent
// calls for the same name are safe.
func (p *Postgres) CreateDatabase(ctx context.Context, name string) error {
	db, err := sql.Open("postgres", p.URLFor("postgres"))
	if err != nil {
		return fmt.Errorf("create database %s: %w", name, err)
	}
	err = createDatabase(ctx, db, name)
	return errors.Join(err, db.Close())
}

// createDatabase runs CREATE DATABASE, which has no IF NOT EXISTS, after
// checking the catalog, and treats losing a race to another creator as
// success.
func createDatabase(ctx context.Context, db *sql.DB, name string) error {
	var exists bool
	if err := db.QueryRowContext(ctx, "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", name).Scan(&exists); err != nil {
		return fmt.Errorf("create database %s: %w", name, err)
	}
	if exists {
		return nil
	}
	_, err := db.ExecContext(ctx, "CREATE DATABASE "+pq.QuoteIdentifier(name))
	var pqErr *pq.Error
	// 42P04 duplicate_database; 23505 unique_violation on pg_database when
	// two creators pass the check at the same time.
	if errors.As(err, &pqErr) && (pqErr.Code == "42P04" || pqErr.Code == "23505") {
		return nil
	}
	if err != nil {
		return fmt.Errorf("create database %s: %w", name, err)
	}
	return nil
}
