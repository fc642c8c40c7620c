package central

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"provision/internal/testutil"
)

func TestInitIdempotent(t *testing.T) {
	dsn := testutil.PostgresDB(t)
	ctx := context.Background()
	var wg sync.WaitGroup
	errs := make([]error, 3)
	for i := range errs {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = Init(ctx, dsn) }()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("concurrent init %d: %v", i, err)
		}
	}
	if err := Init(ctx, dsn); err != nil {
		t.Fatalf("init again: %v", err)
	}
	s, err := Open(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if got, want := count(t, s, "SELECT count(*) FROM schema_version"), len(migrations()); got != want {
		t.Errorf("schema_version rows = %d, want %d", got, want)
	}
	if err := s.Ping(ctx); err != nil {
		t.Error(err)
	}
}

func TestOpenNotInitialised(t *testing.T) {
	dsn := testutil.PostgresDB(t)
	_, err := Open(context.Background(), dsn)
	if !errors.Is(err, ErrNotInitialised) {
		t.Fatalf("open of an empty database: %v, want ErrNotInitialised", err)
	}
	if !strings.Contains(err.Error(), "provision central init") {
		t.Errorf("message %q does not say to run provision central init", err)
	}
}

func TestOpenSchemaTooNew(t *testing.T) {
	s := newStore(t)
	if _, err := s.pool.Exec(context.Background(), "INSERT INTO schema_version (version, name) VALUES (9999, 'future')"); err != nil {
		t.Fatal(err)
	}
	dsn := s.pool.Config().ConnString()
	if _, err := Open(context.Background(), dsn); !errors.Is(err, ErrSchemaTooNew) {
		t.Fatalf("open of a newer schema: %v, want ErrSchemaTooNew", err)
	}
}

const secret = "s3cret-Passw0rd"

func TestOpenUnreachable(t *testing.T) {
	pg := testutil.StartPostgres(t)
	ctx := context.Background()
	if err := Init(ctx, pg.DSN); err != nil {
		t.Fatal(err)
	}
	s, err := Open(ctx, pg.DSN)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	withPassword := fmt.Sprintf("postgres://postgres:%s@127.0.0.1:%d/postgres?sslmode=disable", secret, pg.Port)

	pg.Stop(t)
	start := time.Now()
	_, err = Open(ctx, withPassword)
	if !errors.Is(err, ErrUnreachable) {
		t.Fatalf("open of a stopped server: %v, want ErrUnreachable", err)
	}
	if took := time.Since(start); took > 4*time.Second {
		t.Errorf("open of a stopped server took %v", took)
	}
	if strings.Contains(err.Error(), secret) {
		t.Errorf("message shows the password: %v", err)
	}
	t.Logf("open of a stopped server: %v", err)
	if err := Init(ctx, withPassword); !errors.Is(err, ErrUnreachable) || strings.Contains(err.Error(), secret) {
		t.Errorf("init of a stopped server: %v, want ErrUnreachable without the password", err)
	}
	if err := s.Ping(ctx); !errors.Is(err, ErrUnreachable) {
		t.Errorf("ping of a stopped server: %v, want ErrUnreachable", err)
	}
	if _, err := s.Push(ctx, newChain("line-1").unitBatch("SN-1")); !errors.Is(err, ErrUnreachable) {
		t.Errorf("push to a stopped server: %v, want ErrUnreachable", err)
	}

	pg.Start(t)
	// The pool reconnects by itself once the server is back.
	if _, err := s.Push(ctx, newChain("line-1").unitBatch("SN-1")); err != nil {
		t.Errorf("push after restart: %v", err)
	}
	s2, err := Open(ctx, withPassword)
	if err != nil {
		t.Fatalf("open after restart: %v", err)
	}
	s2.Close()
}

func TestOpenTimeout(t *testing.T) {
	addr, _ := testutil.SilentListener(t) // accepts and never answers
	dsn := fmt.Sprintf("postgres://postgres:%s@%s/db?sslmode=disable", secret, addr)
	start := time.Now()
	_, err := Open(context.Background(), dsn)
	if !errors.Is(err, ErrUnreachable) {
		t.Fatalf("open of a silent server: %v, want ErrUnreachable", err)
	}
	t.Logf("open of a silent server: %v (%v)", err, time.Since(start))
	if took := time.Since(start); took > ConnectTimeout+2*time.Second {
		t.Errorf("open of a silent server took %v, want about %v", took, ConnectTimeout)
	}
	if strings.Contains(err.Error(), secret) {
		t.Errorf("message shows the password: %v", err)
	}
	// The caller's deadline is honoured too.
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start = time.Now()
	if _, err := Open(ctx, dsn); err == nil {
		t.Fatal("open with a short deadline succeeded")
	}
	if took := time.Since(start); took > time.Second {
		t.Errorf("open with a 300ms deadline took %v", took)
	}
}

func TestOpenBadPassword(t *testing.T) {
	pg := testutil.StartPostgres(t)
	pg.Exec(t, "CREATE ROLE alice LOGIN PASSWORD 'right-password'")
	hba := filepath.Join(pg.Dir, "data", "pg_hba.conf")
	old, err := os.ReadFile(hba)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(hba, append([]byte("host all alice 127.0.0.1/32 scram-sha-256\n"), old...), 0o600); err != nil {
		t.Fatal(err)
	}
	pg.Exec(t, "SELECT pg_reload_conf()")
	dsn := fmt.Sprintf("postgres://alice:%s@127.0.0.1:%d/postgres?sslmode=disable", secret, pg.Port)
	_, err = Open(context.Background(), dsn)
	if !errors.Is(err, ErrUnreachable) {
		t.Fatalf("open with a wrong password: %v, want ErrUnreachable", err)
	}
	if strings.Contains(err.Error(), secret) {
		t.Errorf("message shows the password: %v", err)
	}
	t.Logf("open with a wrong password: %v", err)
	if !strings.Contains(err.Error(), "alice") {
		t.Errorf("message %q does not name the user", err)
	}
}

func TestOpenNoDatabase(t *testing.T) {
	pg := testutil.StartPostgres(t)
	dsn := strings.Replace(pg.DSN, "/postgres?", "/nosuchdb?", 1)
	_, err := Open(context.Background(), dsn)
	if !errors.Is(err, ErrUnreachable) || !strings.Contains(err.Error(), "nosuchdb") {
		t.Fatalf("open of a missing database: %v, want ErrUnreachable naming it", err)
	}
}

func TestDSNNeverShown(t *testing.T) {
	for _, dsn := range []string{
		"postgres://bob:" + secret + "@db.example:notaport/x",
		"postgres://bob:" + secret + "@db.example:5432/x?sslmode=bogus",
		"host=db.example password=" + secret + " port=notaport",
		"postgres://bob:" + secret + "@[::1/x",
	} {
		err := Init(context.Background(), dsn)
		if err == nil {
			t.Errorf("%q parsed", dsn)
			continue
		}
		if strings.Contains(err.Error(), secret) {
			t.Errorf("message shows the password: %v", err)
		}
		if got := RedactDSN(dsn); strings.Contains(got, secret) {
			t.Errorf("RedactDSN(%q) = %q", dsn, got)
		}
	}
	if got, want := RedactDSN("postgres://bob:"+secret+"@db.example:5433/inv?sslmode=disable"), "postgres://bob@db.example:5433/inv"; got != want {
		t.Errorf("RedactDSN = %q, want %q", got, want)
	}
}

func TestCancelledContext(t *testing.T) {
	s := newStore(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := s.Push(ctx, newChain("line-1").unitBatch("SN-1")); !errors.Is(err, context.Canceled) {
		t.Errorf("push with a cancelled context: %v", err)
	}
	if _, _, err := s.Units(ctx, UnitFilter{}); !errors.Is(err, context.Canceled) {
		t.Errorf("units with a cancelled context: %v", err)
	}
}
