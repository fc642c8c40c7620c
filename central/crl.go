package central

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// Each station's latest CRL (table crls): pushed by the station's sync, served by `provision serve` at any station
// under /crl/<station_id>. The store does not check the CRL's signature (it does not know the stations' CAs; relying
// parties do); it keeps, per station, the CRL with the highest number it was given.

// PutCRL stores station's CRL (DER) when number is higher than the stored one's: an equal number is a no-op (a repeat)
// and a lower one is ignored (an older CRL arriving late), so the store never goes back. number, thisUpdate and
// nextUpdate must be the CRL's own (checked against der).
func (s *Store) PutCRL(ctx context.Context, station string, der []byte, number int64, thisUpdate, nextUpdate time.Time) error {
	if station == "" {
		return errors.New("central: crl without a station id")
	}
	rl, err := x509.ParseRevocationList(der)
	if err != nil {
		return fmt.Errorf("central: crl of station %s: %w", station, err)
	}
	if rl.Number == nil || !rl.Number.IsInt64() || rl.Number.Int64() != number || number < 0 ||
		!rl.ThisUpdate.Equal(thisUpdate) || !rl.NextUpdate.Equal(nextUpdate) {
		return fmt.Errorf("central: crl of station %s: number %d, thisUpdate %s, nextUpdate %s are not the CRL's own",
			station, number, thisUpdate.UTC().Format(time.RFC3339), nextUpdate.UTC().Format(time.RFC3339))
	}
	_, err = s.pool.Exec(ctx, `INSERT INTO crls (station, number, der, this_update, next_update, updated_at)
		VALUES ($1, $2, $3, $4, $5, statement_timestamp())
		ON CONFLICT (station) DO UPDATE SET number = excluded.number, der = excluded.der,
			this_update = excluded.this_update, next_update = excluded.next_update, updated_at = excluded.updated_at
		WHERE crls.number < excluded.number`, station, number, der, thisUpdate, nextUpdate)
	return classify(s.where, "put crl of station "+station, err)
}

// CRL is station's latest CRL (DER), or an error wrapping ErrNotFound when the store holds none.
func (s *Store) CRL(ctx context.Context, station string) ([]byte, error) {
	var der []byte
	err := s.pool.QueryRow(ctx, "SELECT der FROM crls WHERE station = $1", station).Scan(&der)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("central: crl of station %q: %w", station, ErrNotFound)
	}
	if err != nil {
		return nil, classify(s.where, "crl of station "+station, err)
	}
	return der, nil
}

// CRLNumber is the number of station's stored CRL, 0 when the store holds none (a station's CRLs are numbered from
// 1): a station pushes its CRL when its own number is higher.
func (s *Store) CRLNumber(ctx context.Context, station string) (int64, error) {
	var n int64
	err := s.pool.QueryRow(ctx, "SELECT number FROM crls WHERE station = $1", station).Scan(&n)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, nil
	}
	if err != nil {
		return 0, classify(s.where, "crl number of station "+station, err)
	}
	return n, nil
}
