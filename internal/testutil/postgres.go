package testutil

// PostgreSQL for tests: a throw-away cluster made with Debian's `postgresql` package (initdb + postgres from
// /usr/lib/postgresql/<version>/bin, not on PATH on a stock Debian), run as the `postgres` user when the tests run as
// root (PostgreSQL refuses root), in a directory under /tmp that user can reach, listening on a free loopback port
// and on a Unix socket in that directory. fsync and full_page_writes are off (the data is thrown away, and only a
// machine crash would lose what they protect); synchronous_commit stays on, so Stop (an immediate shutdown, as a crash)
// loses no committed transaction.
//
// Two ways in: StartPostgres gives a test its own cluster (Stop and Start simulate an outage); PostgresDB gives a
// test a fresh database on one cluster shared by the whole test binary (2 s of initdb paid once). The postgres
// process gets SIGQUIT (immediate shutdown) when the test binary dies; the shared cluster's directory is removed after
// the binary exits, and each cluster directory names the process that owns it, so a directory left by a killed test
// run is removed by the next one.

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

const pgDirPrefix = "provision-pg-"

// Postgres is a throw-away PostgreSQL cluster.
type Postgres struct {
	DSN  string // postgres://postgres@127.0.0.1:PORT/postgres?sslmode=disable (trust authentication)
	Dir  string // the cluster's directory: data/ (PGDATA), the Unix socket, log
	Port int

	bin  string // /usr/lib/postgresql/<version>/bin
	cred *syscall.Credential
	cmd  *exec.Cmd
	done chan struct{}
	mu   sync.Mutex
}

// pgBin is the newest /usr/lib/postgresql/<version>/bin holding initdb and postgres, or "".
func pgBin() string {
	found, _ := filepath.Glob("/usr/lib/postgresql/*/bin/initdb")
	sort.Slice(found, func(i, j int) bool { return pgVersion(found[i]) > pgVersion(found[j]) })
	for _, f := range found {
		bin := filepath.Dir(f)
		if _, err := os.Stat(filepath.Join(bin, "postgres")); err == nil {
			return bin
		}
	}
	return ""
}

func pgVersion(initdb string) int {
	v, _ := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(initdb))))
	return v
}

// pgCredential is the postgres user's when running as root (nil otherwise: the cluster runs as the current user).
func pgCredential() (*syscall.Credential, error) {
	if os.Geteuid() != 0 {
		return nil, nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, fmt.Errorf("postgres user: %w (install Debian's postgresql package)", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
}

// requirePostgres skips (fails under CI) when the PostgreSQL server is not installed, and returns its bin directory.
func requirePostgres(tb testing.TB) string {
	tb.Helper()
	bin := pgBin()
	RequireFacility(tb, bin != "", "PostgreSQL server not installed (Debian package postgresql: /usr/lib/postgresql/*/bin/initdb)")
	return bin
}

// newPostgres makes a cluster (initdb) in a fresh directory under /tmp and starts it.
func newPostgres(bin string) (*Postgres, error) {
	sweepStalePostgres()
	cred, err := pgCredential()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("/tmp", pgDirPrefix)
	if err != nil {
		return nil, err
	}
	p := &Postgres{Dir: dir, bin: bin, cred: cred}
	fail := func(err error) (*Postgres, error) { os.RemoveAll(dir); return nil, err }
	if err := os.WriteFile(filepath.Join(dir, "owner"), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		return fail(err)
	}
	if cred != nil {
		if err := os.Chown(dir, int(cred.Uid), int(cred.Gid)); err != nil {
			return fail(err)
		}
	}
	out, err := p.command("initdb", "-D", p.data(), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8",
		"--locale=C").CombinedOutput()
	if err != nil {
		return fail(fmt.Errorf("initdb: %v\n%s", err, out))
	}
	port, err := freeTCPPort()
	if err != nil {
		return fail(err)
	}
	p.Port = port
	p.DSN = fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", port)
	if err := p.start(); err != nil {
		return fail(err)
	}
	return p, nil
}

func (p *Postgres) data() string { return filepath.Join(p.Dir, "data") }

// command runs a tool of the PostgreSQL bin directory as the cluster's user, in the cluster's directory.
func (p *Postgres) command(tool string, args ...string) *exec.Cmd {
	cmd := exec.Command(filepath.Join(p.bin, tool), args...)
	cmd.Dir = p.Dir
	cmd.Env = []string{"PATH=/usr/bin:/bin", "LANG=C", "HOME=" + p.Dir}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: p.cred}
	return cmd
}

// start runs postgres on p.Port and waits (up to 30 s) until it accepts connections.
func (p *Postgres) start() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd != nil {
		return nil
	}
	log, err := os.OpenFile(filepath.Join(p.Dir, "log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer log.Close()
	cmd := p.command("postgres", "-D", p.data(), "-p", strconv.Itoa(p.Port), "-k", p.Dir,
		"-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "max_connections=200", "-c", "shared_buffers=64MB")
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr.Pdeathsig = syscall.SIGQUIT // immediate shutdown when the test binary dies
	os.Remove(filepath.Join(p.data(), "postmaster.pid"))
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start postgres: %w", err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case <-done:
			return fmt.Errorf("postgres exited at start:\n%s", p.logTail())
		default:
		}
		// postgres writes "ready" as the pid file's 8th line once it accepts connections (what pg_ctl -w reads).
		if b, err := os.ReadFile(filepath.Join(p.data(), "postmaster.pid")); err == nil {
			if lines := strings.Split(string(b), "\n"); len(lines) > 7 && strings.TrimSpace(lines[7]) == "ready" {
				p.cmd, p.done = cmd, done
				return nil
			}
		}
		if time.Now().After(deadline) {
			cmd.Process.Signal(syscall.SIGQUIT)
			<-done
			return fmt.Errorf("postgres not ready after 30 s:\n%s", p.logTail())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (p *Postgres) logTail() string {
	b, _ := os.ReadFile(filepath.Join(p.Dir, "log"))
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return string(b)
}

// stop shuts postgres down at once (immediate mode: what a crash or a pulled cable looks like to clients).
func (p *Postgres) stop() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		return
	}
	p.cmd.Process.Signal(syscall.SIGQUIT)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
	}
	p.cmd, p.done = nil, nil
}

// Stop stops the server (immediate shutdown); its data stays for Start.
func (p *Postgres) Stop(tb testing.TB) {
	tb.Helper()
	p.stop()
}

// Start starts a stopped server again on the same port and data (after crash recovery).
func (p *Postgres) Start(tb testing.TB) {
	tb.Helper()
	if err := p.start(); err != nil {
		tb.Fatal(err)
	}
}

// remove stops the server and deletes its directory.
func (p *Postgres) remove() {
	p.stop()
	os.RemoveAll(p.Dir)
}

// StartPostgres gives the test a cluster of its own (stopped and removed at cleanup): for tests that stop and start
// the server. Tests that only need a database use PostgresDB.
func StartPostgres(tb testing.TB) *Postgres {
	tb.Helper()
	bin := requirePostgres(tb)
	p, err := newPostgres(bin)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(p.remove)
	return p
}

var shared struct {
	once sync.Once
	p    *Postgres
	err  error
	n    atomic.Int64
}

// PostgresDB returns the DSN of a fresh, empty database (dropped at cleanup) on the cluster the test binary shares.
func PostgresDB(tb testing.TB) string {
	tb.Helper()
	bin := requirePostgres(tb)
	shared.once.Do(func() {
		if shared.p, shared.err = newPostgres(bin); shared.err == nil {
			reapAtExit(shared.p.Dir)
		}
	})
	if shared.err != nil {
		tb.Fatal(shared.err)
	}
	return shared.p.CreateDB(tb)
}

// CreateDB creates a fresh database on p (dropped at cleanup) and returns its DSN.
func (p *Postgres) CreateDB(tb testing.TB) string {
	tb.Helper()
	name := fmt.Sprintf("t%d_%d", os.Getpid(), shared.n.Add(1))
	if err := p.psql("CREATE DATABASE " + name); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := p.psql("DROP DATABASE IF EXISTS " + name + " WITH (FORCE)"); err != nil {
			tb.Log(err)
		}
	})
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", p.Port, name)
}

// psql runs one SQL command on the postgres database through the cluster's socket.
func (p *Postgres) psql(sql string) error {
	out, err := p.command("psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", p.Dir, "-p", strconv.Itoa(p.Port),
		"-U", "postgres", "-d", "postgres", "-c", sql).CombinedOutput()
	if err != nil {
		return fmt.Errorf("psql %q: %v\n%s", sql, err, out)
	}
	return nil
}

// Exec runs SQL statements on the postgres database of p as the superuser (test set-up: roles, settings).
func (p *Postgres) Exec(tb testing.TB, sql string) {
	tb.Helper()
	if err := p.psql(sql); err != nil {
		tb.Fatal(err)
	}
}

// freeTCPPort is a loopback port that was free a moment ago.
func freeTCPPort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// reapAtExit removes dir once this process has ended, however it ends (its postgres gets SIGQUIT then): a detached
// shell polls for the process, so the shared cluster, which no test's cleanup may remove, leaves nothing behind.
func reapAtExit(dir string) {
	cmd := exec.Command("sh", "-c", `while kill -0 "$0" 2>/dev/null; do sleep 1; done; sleep 1; rm -rf -- "$1"`,
		strconv.Itoa(os.Getpid()), dir)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if cmd.Start() == nil {
		cmd.Process.Release()
	}
}

// sweepStalePostgres removes cluster directories whose owning test process is gone (a killed test run).
func sweepStalePostgres() {
	dirs, _ := filepath.Glob(filepath.Join("/tmp", pgDirPrefix+"*"))
	for _, d := range dirs {
		b, err := os.ReadFile(filepath.Join(d, "owner"))
		if err != nil {
			continue
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || pid == os.Getpid() || processAlive(pid) {
			continue
		}
		if pm, err := os.ReadFile(filepath.Join(d, "data", "postmaster.pid")); err == nil {
			if pmPid, err := strconv.Atoi(strings.SplitN(string(pm), "\n", 2)[0]); err == nil && processAlive(pmPid) {
				syscall.Kill(pmPid, syscall.SIGQUIT)
			}
		}
		os.RemoveAll(d)
	}
}

func processAlive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}
