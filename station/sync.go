package station

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"sync"
	"time"

	"provision/central"
	"provision/inventory"
)

// Forwarding to the central store (docs/central.md). The station's SQLite inventory stays the write-ahead record: a
// unit's steps are committed there first, whatever the network does. Sync then sends the audit log in order, from a
// durable cursor, with the current rows of the units each batch of events touches; the store stores a repeat as a
// no-op and reports a differing one as a conflict. The cursor moves only after the store committed, so a station
// killed mid-sync sends the same batch again (a no-op) and nothing is lost or stored twice.

// syncName is the cursor's name in the inventory's sync_state table.
const syncName = "central"

// syncBatch is how many audit entries one push carries.
const syncBatch = 500

// ErrCentralUnreachable: the central store cannot be reached while station.yaml says central.mode: required (exit 4).
var ErrCentralUnreachable = errors.New("central store unreachable (central.mode: required)")

// SyncResult is what one sync did.
type SyncResult struct {
	Events    int   // audit entries the store acknowledged in this sync
	Backlog   int64 // entries still to send
	Conflicts []central.Conflict
	CRL       int64 // the number of the CRL this sync pushed; 0: none (the store's is as new, or there is none)
}

// SyncStatus is the backlog without contacting the store.
type SyncStatus struct {
	Cursor   int64     // the last entry the store acknowledged
	Head     int64     // the newest entry
	Backlog  int64     // Head − Cursor
	LastSync time.Time // zero: never
	Oldest   time.Time // time of the oldest entry not yet sent (zero when none)
}

// SyncStatus reads the backlog from the inventory alone.
func (s *Station) SyncStatus(ctx context.Context) (SyncStatus, error) {
	c, err := s.Inv.SyncCursor(ctx, syncName)
	if err != nil {
		return SyncStatus{}, err
	}
	head, err := s.Inv.LastSeq(ctx)
	if err != nil {
		return SyncStatus{}, err
	}
	st := SyncStatus{Cursor: c.Seq, Head: head, Backlog: head - c.Seq, LastSync: c.Synced}
	if st.Backlog > 0 {
		if evs, err := s.Inv.EventsAfter(ctx, c.Seq, 1); err == nil && len(evs) == 1 {
			st.Oldest = evs[0].Time
		}
	}
	return st, nil
}

// Sync forwards everything not yet acknowledged to store, batch after batch, until the backlog is empty or ctx ends.
// One sync runs at a time per station.
func (s *Station) Sync(ctx context.Context, store *central.Store) (SyncResult, error) {
	s.syncMu.Lock()
	defer s.syncMu.Unlock()
	var res SyncResult
	cur, err := s.reconcileCursor(ctx, store)
	if err != nil {
		return res, err
	}
	head, err := s.Inv.LastSeq(ctx)
	if err != nil {
		return res, err
	}
	for cur.Seq < head {
		if err := ctx.Err(); err != nil {
			return res, err
		}
		events, err := s.Inv.EventsAfter(ctx, cur.Seq, syncBatch)
		if err != nil || len(events) == 0 {
			return res, err
		}
		b, err := s.syncBatchOf(ctx, events)
		if err != nil {
			return res, err
		}
		last := events[len(events)-1]
		b.Backlog = head - last.Seq
		pr, err := store.Push(ctx, b)
		if err != nil {
			return res, fmt.Errorf("sync: push entries %d to %d: %w", events[0].Seq, last.Seq, err)
		}
		res.Conflicts = append(res.Conflicts, pr.Conflicts...)
		for _, c := range pr.Conflicts {
			s.Log.Warn("central store conflict", "kind", c.Kind, "key", c.Key, "other", c.Other, "detail", c.Detail)
		}
		// The store committed: the cursor may move. A crash right here sends the batch again: a no-op.
		if err := s.Inv.SetSyncCursor(context.WithoutCancel(ctx), syncName, last.Seq, last.Hash); err != nil {
			return res, err
		}
		cur = inventory.SyncCursor{Seq: last.Seq, Hash: last.Hash}
		res.Events += len(events)
		if head, err = s.Inv.LastSeq(ctx); err != nil {
			return res, err
		}
	}
	res.Backlog = head - cur.Seq
	if res.CRL, err = s.pushCRL(ctx, store); err != nil {
		return res, err
	}
	return res, nil
}

// pushCRL sends the station's latest CRL (crl.der, written by provision crl, revoke, rma and serve) when its number is
// higher than the one the store holds, and returns that number (0: nothing sent). The number is the cursor: the store
// keeps the highest, so a repeat or a late older CRL changes nothing. A file that is not a CRL of this station's
// issuing CA is not sent.
func (s *Station) pushCRL(ctx context.Context, store *central.Store) (int64, error) {
	der, err := os.ReadFile(s.Layout.CRLFile())
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil // no CRL made yet
	}
	if err != nil {
		return 0, fmt.Errorf("sync: crl: %w", err)
	}
	rl, err := x509.ParseRevocationList(der)
	if err != nil || rl.Number == nil || !rl.Number.IsInt64() {
		return 0, fmt.Errorf("sync: %s is not a CRL the station made (%v): run provision crl", s.Layout.CRLFile(), err)
	}
	stored, err := store.CRLNumber(ctx, s.Config.StationID)
	if err != nil {
		return 0, fmt.Errorf("sync: %w", err)
	}
	number := rl.Number.Int64()
	if number <= stored {
		return 0, nil
	}
	blk, err := s.issuingCertBlock()
	if err != nil {
		return 0, fmt.Errorf("sync: crl: %w", err)
	}
	cert, err := x509.ParseCertificate(blk.Bytes)
	if err == nil {
		err = rl.CheckSignatureFrom(cert)
	}
	if err != nil {
		return 0, fmt.Errorf("sync: %s is not signed by this station's issuing CA (%v): run provision crl", s.Layout.CRLFile(), err)
	}
	if err := store.PutCRL(ctx, s.Config.StationID, der, number, rl.ThisUpdate, rl.NextUpdate); err != nil {
		return 0, fmt.Errorf("sync: %w", err)
	}
	return number, nil
}

// reconcileCursor starts from what the store really holds of this station's chain: ahead of the local cursor (a
// crash after the store committed), behind it (the store restored from an older backup: send again), or equal.
func (s *Station) reconcileCursor(ctx context.Context, store *central.Store) (inventory.SyncCursor, error) {
	cur, err := s.Inv.SyncCursor(ctx, syncName)
	if err != nil {
		return cur, err
	}
	seq, hash, err := store.StationHead(ctx, s.Config.StationID)
	if err != nil {
		return cur, fmt.Errorf("sync: %w", err)
	}
	if seq == cur.Seq && hash == cur.Hash {
		return cur, nil
	}
	if seq == 0 {
		return inventory.SyncCursor{}, nil
	}
	evs, err := s.Inv.EventsAfter(ctx, seq-1, 1)
	if err != nil {
		return cur, err
	}
	if len(evs) == 0 || evs[0].Seq != seq || evs[0].Hash != hash {
		return cur, fmt.Errorf("sync: the central store holds entry %d of station %s with hash %.16s, which is not this "+
			"station's (another station uses the id %q, or this inventory was replaced): %w", seq, s.Config.StationID,
			hash, s.Config.StationID, central.ErrConflict)
	}
	return inventory.SyncCursor{Seq: seq, Hash: hash}, nil
}

// syncBatchOf is a push of events with the current rows of the units they touch.
func (s *Station) syncBatchOf(ctx context.Context, events []inventory.Event) (central.Batch, error) {
	b := central.Batch{Station: s.Config.StationID}
	seen := map[string]bool{}
	for _, e := range events {
		b.Events = append(b.Events, central.Event{Station: s.Config.StationID, Seq: e.Seq, Time: e.Time, Serial: e.Serial,
			Step: e.Step, Outcome: e.Outcome, Detail: e.Detail, MS: e.MS, Operator: e.Operator, CertSHA256: e.CertSHA256,
			PrevHash: e.PrevHash, Hash: e.Hash})
		if e.Serial == "" || seen[e.Serial] {
			continue
		}
		seen[e.Serial] = true
		u, err := s.Inv.Unit(ctx, e.Serial)
		if errors.Is(err, inventory.ErrNotFound) {
			continue
		}
		if err != nil {
			return b, err
		}
		b.Units = append(b.Units, central.Unit{Serial: u.Serial, Station: s.Config.StationID, State: string(u.State),
			FailedStep: u.FailedStep, Error: u.Error, KeyKind: u.KeyKind, PublicSHA256: u.PublicSHA256, EKSHA256: u.EKSHA256,
			EKCertSHA256: u.EKCertSHA256, Operator: u.Operator, Created: u.Created, Updated: u.Updated})
		certs, err := s.Inv.Certificates(ctx, u.Serial)
		if err != nil {
			return b, err
		}
		for _, c := range certs {
			cc := central.Certificate{Serial: c.Serial, Unit: c.Unit, Station: s.Config.StationID, SHA256: c.SHA256,
				Status: c.Status, NotBefore: c.NotBefore, NotAfter: c.NotAfter, Issued: c.Issued}
			if len(c.DER) > 0 && sha256Hex(c.DER) == c.SHA256 { // the inventory keeps certificates since its version 5
				cc.DER = c.DER
			}
			b.Certificates = append(b.Certificates, cc)
		}
		atts, err := s.Inv.Attestations(ctx, u.Serial)
		if err != nil {
			return b, err
		}
		for _, a := range atts {
			b.Attestations = append(b.Attestations, central.Attestation{Station: s.Config.StationID, LocalID: a.ID, Serial: a.Serial,
				Time: a.Time, Policy: a.Policy, Outcome: a.Outcome, Status: a.Status, EKSHA256: a.EKSHA256,
				EKCertSHA256: a.EKCertSHA256, EKIssuer: a.EKIssuer, TPMManufacturer: a.TPMManufacturer, Cause: a.Cause,
				Warnings: a.Warnings, Evidence: a.Evidence, EvidenceSHA256: a.EvidenceSHA256})
		}
	}
	return b, nil
}

// Syncer forwards in the background while a front end runs (tui, batch): after each unit (Kick) and every interval.
// Errors are logged and kept for Status; the line never waits for it.
type Syncer struct {
	s        *Station
	interval time.Duration
	kick     chan struct{}

	mu      sync.Mutex
	lastErr error
	last    SyncResult
	lastAt  time.Time
}

// NewSyncer makes a background syncer for a station connected to a central store (ConnectCentral); nil when the
// station has none.
func (s *Station) NewSyncer(interval time.Duration) *Syncer {
	if s.central == nil {
		return nil
	}
	return &Syncer{s: s, interval: interval, kick: make(chan struct{}, 1)}
}

// Kick asks for a sync soon (after a unit finished).
func (y *Syncer) Kick() {
	if y == nil {
		return
	}
	select {
	case y.kick <- struct{}{}:
	default:
	}
}

// Run syncs until ctx ends; then it makes one last attempt bounded by a few seconds.
func (y *Syncer) Run(ctx context.Context) {
	t := time.NewTicker(y.interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			y.Once(fctx)
			cancel()
			return
		case <-t.C:
		case <-y.kick:
		}
		y.Once(ctx)
	}
}

// Once syncs now and returns what it did.
func (y *Syncer) Once(ctx context.Context) (SyncResult, error) {
	res, err := y.s.SyncCentral(ctx)
	y.mu.Lock()
	defer y.mu.Unlock()
	y.lastErr, y.lastAt = err, time.Now()
	if err == nil {
		y.last = res
	} else {
		y.s.Log.Debug("sync", "error", err)
	}
	return res, err
}

// Status is the last sync's outcome: its result, when it ran (zero: not yet) and its error (nil when it worked).
func (y *Syncer) Status() (SyncResult, time.Time, error) {
	y.mu.Lock()
	defer y.mu.Unlock()
	return y.last, y.lastAt, y.lastErr
}
