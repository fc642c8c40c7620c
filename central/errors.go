package central

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// RedactDSN is the DSN as messages show it: postgres://USER@HOST:PORT/DATABASE, never a password (built from pgx's
// parsed configuration, not by editing the string). A DSN that does not parse gives "(unparseable dsn)".
func RedactDSN(dsn string) string {
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return "(unparseable dsn)"
	}
	return redact(cfg)
}

func redact(cfg *pgxpool.Config) string {
	c := cfg.ConnConfig
	host := c.Host
	if len(host) > 0 && host[0] != '/' {
		host = net.JoinHostPort(host, strconv.Itoa(int(c.Port)))
	} else {
		host = url.PathEscape(host) + ":" + strconv.Itoa(int(c.Port)) // a Unix socket directory
	}
	u := url.URL{Scheme: "postgres", User: url.User(c.User), Host: host, Path: "/" + c.Database}
	return u.String()
}

// setDefaults bounds connection attempts and names the application in pg_stat_activity.
func setDefaults(cfg *pgxpool.Config) {
	if cfg.ConnConfig.ConnectTimeout == 0 {
		cfg.ConnConfig.ConnectTimeout = ConnectTimeout
	}
	if cfg.ConnConfig.RuntimeParams["application_name"] == "" {
		cfg.ConnConfig.RuntimeParams["application_name"] = "provision"
	}
}

// parseError describes a DSN that does not parse without repeating it: pgx's own message quotes the DSN with the
// password masked only on a best-effort basis, and net/url's errors quote it whole.
func parseError(err error) error {
	cause := "see PostgreSQL's connection URI syntax"
	var ue *url.Error
	var pce *pgconn.ParseConfigError
	switch {
	case errors.As(err, &ue):
		cause = ue.Err.Error()
	case errors.As(err, &pce) && pce.Unwrap() != nil:
		cause = pce.Unwrap().Error()
	}
	return fmt.Errorf("central: the dsn does not parse: %s", cause)
}

// unreachable wraps a connection failure.
func unreachable(where string, err error) error {
	return fmt.Errorf("%w (%s): %w", ErrUnreachable, where, err)
}

// classify wraps err from an operation: server errors as they are (they carry SQLSTATE codes), except those that mean
// the server is going away or cannot be reached; everything else from the driver (refused, reset, timed out, closed)
// as ErrUnreachable. A cancelled ctx stays a cancellation.
func classify(where, op string, err error) error {
	if err == nil {
		return nil
	}
	var pe *pgconn.PgError
	var ce *pgconn.ConnectError
	switch {
	case errors.Is(err, context.Canceled), errors.Is(err, ErrConflict), errors.Is(err, ErrClaimed),
		errors.Is(err, ErrNotFound), errors.Is(err, ErrBadCursor):
		return fmt.Errorf("central: %s: %w", op, err)
	case errors.As(err, &ce): // refused, timed out, authentication failed, no such database
		return fmt.Errorf("central: %s: %w", op, unreachable(where, err))
	case errors.As(err, &pe):
		if c := pe.Code; strings.HasPrefix(c, "08") || strings.HasPrefix(c, "28") || strings.HasPrefix(c, "57P") {
			return fmt.Errorf("central: %s: %w", op, unreachable(where, err))
		}
		return fmt.Errorf("central: %s: %w", op, err)
	}
	return fmt.Errorf("central: %s: %w", op, unreachable(where, err))
}

// sqlState is err's SQLSTATE, or "".
func sqlState(err error) string {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.Code
	}
	return ""
}
