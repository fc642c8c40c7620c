package station

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"provision/central"
)

// The station's link to the central store: opened on first use, reopened after it was unreachable (at most every
// retryAfter, so a line in preferred mode does not wait on a dead database for every unit), shared by claims and sync.

const (
	centralOpenTimeout = 3 * time.Second
	centralRetryAfter  = 5 * time.Second
	// centralClaimTTL bounds a station's claim on a serial in the central store: a station that died releases its
	// units after it (the local claim, a lock the kernel drops, covers this station's own processes).
	centralClaimTTL = 15 * time.Minute
)

type centralLink struct {
	open func(context.Context) (*central.Store, error)
	mode string

	mu      sync.Mutex
	store   *central.Store
	lastErr error
	retryAt time.Time
}

// ConnectCentral links the station to its central store (station.yaml central:); open connects (the caller wires
// central.Open with the DSN). Nothing is opened yet.
func (s *Station) ConnectCentral(open func(context.Context) (*central.Store, error)) {
	s.central = &centralLink{open: open, mode: s.Config.Central.CentralMode()}
}

// HasCentral reports whether the station forwards to a central store.
func (s *Station) HasCentral() bool { return s.central != nil }

// centralStore is the open store, opening it when needed; the error wraps central.ErrUnreachable when it cannot be
// reached (or was not, less than centralRetryAfter ago).
func (s *Station) centralStore(ctx context.Context) (*central.Store, error) {
	l := s.central
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.store != nil {
		return l.store, nil
	}
	if time.Now().Before(l.retryAt) {
		return nil, l.lastErr
	}
	octx, cancel := context.WithTimeout(ctx, centralOpenTimeout)
	defer cancel()
	st, err := l.open(octx)
	if err != nil {
		l.lastErr, l.retryAt = err, time.Now().Add(centralRetryAfter)
		return nil, err
	}
	l.store, l.lastErr = st, nil
	return st, nil
}

// CentralStore is the open central store (for commands that use it directly: batch --central, serve).
func (s *Station) CentralStore(ctx context.Context) (*central.Store, error) {
	if s.central == nil {
		return nil, errors.New("station.yaml names no central store (central: dsn)")
	}
	return s.centralStore(ctx)
}

// centralFailed drops the store after an unreachable error, so the next use reopens it.
func (s *Station) centralFailed(err error) {
	if s.central == nil || !errors.Is(err, central.ErrUnreachable) {
		return
	}
	l := s.central
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.store != nil {
		l.store.Close()
		l.store = nil
	}
	l.lastErr, l.retryAt = err, time.Now().Add(centralRetryAfter)
}

// CloseCentral closes the store, if open.
func (s *Station) CloseCentral() {
	if s.central == nil {
		return
	}
	s.central.mu.Lock()
	defer s.central.mu.Unlock()
	if s.central.store != nil {
		s.central.store.Close()
		s.central.store = nil
	}
}

// SyncCentral forwards the backlog to the central store (Sync), opening it when needed.
func (s *Station) SyncCentral(ctx context.Context) (SyncResult, error) {
	if s.central == nil {
		return SyncResult{}, errors.New("sync: station.yaml names no central store (central: dsn)")
	}
	st, err := s.centralStore(ctx)
	if err != nil {
		return SyncResult{}, fmt.Errorf("sync: %w", err)
	}
	res, err := s.Sync(ctx, st)
	s.centralFailed(err)
	return res, err
}

// StationCRL answers `provision serve`'s GET /crl/{station_id}: this station's own CRL as ServeCRL gives it (renewed
// past half its validity when the CA is loaded), and for any other station, or for this one before it made a CRL
// here, the CRL that station's sync pushed to store. None anywhere: an error wrapping central.ErrNotFound (404).
func (s *Station) StationCRL(ctx context.Context, store *central.Store, stationID string) ([]byte, error) {
	der, err := s.ServeCRL(ctx, stationID)
	if err == nil || !errors.Is(err, central.ErrNotFound) || store == nil {
		return der, err
	}
	return store.CRL(ctx, stationID)
}

// centralUnavailable is what an unreachable store means for a unit: in required mode the unit does not start (exit 4);
// in preferred mode the line goes on (nil), logged.
func (s *Station) centralUnavailable(err error) error {
	if s.central.mode == CentralRequired {
		return fmt.Errorf("%w: %w", ErrCentralUnreachable, err)
	}
	s.Log.Warn("central store unreachable: going on with the local inventory (central.mode: preferred)", "error", err)
	return nil
}

// claimCentral claims the serial in the central store before anything is made: refused (ErrRefused, exit 3) when it is
// shippable at, or being provisioned by, another station. release drops the claim.
func (s *Station) claimCentral(ctx context.Context, serial, operator string) (release func(), err error) {
	if s.central == nil {
		return func() {}, nil
	}
	st, err := s.centralStore(ctx)
	if err != nil {
		return func() {}, s.centralUnavailable(err)
	}
	if err := st.ClaimUnit(ctx, serial, s.Config.StationID, operator, centralClaimTTL); err != nil {
		return func() {}, s.centralVerdict(err, ErrRefused)
	}
	return func() {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		defer cancel()
		if err := st.ReleaseUnit(rctx, serial, s.Config.StationID); err != nil {
			s.centralFailed(err)
		}
	}, nil
}

// checkCentralEK refuses a TPM the central store knows bound to another serial (ErrTPMBound, exit 3).
func (s *Station) checkCentralEK(ctx context.Context, ekSHA, serial string) error {
	if s.central == nil {
		return nil
	}
	st, err := s.centralStore(ctx)
	if err != nil {
		return s.centralUnavailable(err)
	}
	return s.centralVerdict(st.CheckEK(ctx, ekSHA, serial), ErrTPMBound)
}

// centralVerdict is what a central check's error means for the unit: taken elsewhere → refused (wrapping refused,
// exit 3); the store unreachable → centralUnavailable (nil in preferred mode); anything else as it is.
func (s *Station) centralVerdict(err, refused error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, central.ErrClaimed):
		return fmt.Errorf("%w: %w", err, refused)
	}
	s.centralFailed(err)
	if errors.Is(err, central.ErrUnreachable) {
		return s.centralUnavailable(err)
	}
	return err
}
