package tpm

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"slices"

	"github.com/google/go-tpm/tpm2"
)

// The Device's session: the path between the station and the unit's TPM (a fixture's USB network, ssh, a forwarded
// socket) is not trusted, so the commands whose parameters or answers matter run in a salted HMAC session keyed to
// the unit's endorsement key. The salt is encrypted to the EK's public key, so only the TPM that holds the EK derives
// the session key: a host in the middle can neither forge the TPM's answers (each carries an HMAC that go-tpm checks)
// nor alter the commands (the TPM checks ours). With the EK certificate verified by the attest step, the EK behind
// the session is proven genuine.
//
// Authorized through the session once StartSession ran (else with the empty password, as before):
//   - TPM2_CreatePrimary of the storage root key (owner) and of a recreated EK (endorsement hierarchy);
//   - TPM2_Create and TPM2_Load of device and attestation keys (the parent SRK's authorization): the new key's public
//     area and Name come back integrity-protected. The private blob is wrapped by the SRK already and not encrypted
//     again;
//   - TPM2_Sign (the key's authorization): the CSR and handshake signatures;
//   - TPM2_Certify (the attestation key's authorization; one HMAC covers the whole command and response, the object's
//     own authorization stays the empty password: the TPM refuses one session on two handles of a command,
//     TPM_RC_HANDLE, and a second session would take a third session slot for nothing);
//   - TPM2_ActivateCredential: the attestation key's authorization goes through a one-off session salted to the EK
//     being activated with, with response parameter encryption (AES-128-CFB), so the recovered credential crosses the
//     path encrypted; the EK keeps its own authorization (empty password, or its policy session). The Device's own
//     session carries no encryption: a session's encrypt attribute holds for every command it authorizes, and the TPM
//     refuses it where the first response parameter is not a sized buffer (TPM2_Sign: TPM_RC_ATTRIBUTES).
//
// Not protected (no authorization, or nothing an attacker gains): TPM2_GetCapability (properties, handle lists),
// TPM2_ReadPublic of persistent EKs (the key is compared with the certificate's), TPM2_NV_ReadPublic and TPM2_NV_Read
// of EK certificates (self-authenticating: signed by the TPM vendor), TPM2_FlushContext, and the EK policy session's
// commands. Error responses are never authenticated (the TPM sends no session area with them): a middle can always
// make a command fail, which is denial of service, not forgery.

// ErrTampered: a TPM response did not pass the session's HMAC check (or the TPM refused the command's HMAC): something
// on the path altered it. The Device is then broken, like after ErrUnreachable: its stream is not trusted any more.
var ErrTampered = errors.New("TPM response failed its session check: the path to the TPM altered it")

// ErrEKMismatch: the endorsement key the TPM holds or makes is not the key its EK certificate names.
var ErrEKMismatch = errors.New("the TPM's endorsement key is not the key its certificate names")

// sessionNonce is the nonce size of the Device's sessions (the SHA-256 digest size, as TPM 2.0 Part 1 advises).
const sessionNonce = 32

// session is a Device's salted HMAC session.
type session struct {
	s        *checked
	salt     crypto.PublicKey // the EK public key the salt was encrypted to
	ekSource string           // where that EK came from ("persistent 0x81010016", "template L-2 (ECC P-256)")
	ekIndex  uint32           // the NV index of its certificate, 0 for the default EK (trust on first use)
}

// checked wraps a go-tpm session so a failed response check is ErrTampered, and remembers whether the last command
// it authorized came back checked.
type checked struct {
	tpm2.Session
	pending bool // Authorize ran, Validate has not yet (the response did not come, or did not parse)
}

func (c *checked) Authorize(cc tpm2.TPMCC, parms, addNonces []byte, names []tpm2.TPM2BName, i int) (*tpm2.TPMSAuthCommand, error) {
	a, err := c.Session.Authorize(cc, parms, addNonces, names, i)
	c.pending = err == nil
	return a, err
}

func (c *checked) Validate(rc tpm2.TPMRC, cc tpm2.TPMCC, parms []byte, names []tpm2.TPM2BName, i int, auth *tpm2.TPMSAuthResponse) error {
	c.pending = false
	if err := c.Session.Validate(rc, cc, parms, names, i, auth); err != nil {
		return fmt.Errorf("%w: %v", ErrTampered, err)
	}
	return nil
}

// StartSession starts the Device's salted HMAC session, kept until Close: its salt is encrypted to the endorsement key
// the certificate at NV ekIndex certifies, whose public key is want (see EndorsementKey). With ekIndex 0 and want nil
// the default EK is used: trust on first use, for TPMs without an EK certificate. With want given, an EK that is not
// that key is refused (ErrEKMismatch). The EK is flushed as soon as the session is up (salting needs it only for
// TPM2_StartAuthSession), so the session costs no object slot afterwards, only one of the TPM's session slots.
//
// From then on CreateKey, LoadKeyFile, Sign, CreateAK, Certify, ActivateCredential and the storage root key run
// through the session (the package comment of session.go lists what it covers), and a response that fails its check
// is ErrTampered. Calling StartSession again with the same EK (or want nil) keeps the running session; with another
// EK it is an error. A soft Device has no session: StartSession is an error.
func (d *Device) StartSession(ctx context.Context, ekIndex uint32, want crypto.PublicKey) error {
	if d.l == nil {
		return errors.New("tpm: session: a software key has no TPM")
	}
	d.mu.Lock()
	up, err := d.sessionUp(want)
	d.mu.Unlock()
	if up || err != nil {
		return err
	}
	ek, err := d.EndorsementKey(ctx, ekIndex, want)
	if err != nil {
		return err
	}
	defer ek.Close() // flushed at once: the session keeps only what the salt derived
	if want != nil && !keyEqual(ek.PublicKey, want) {
		return fmt.Errorf("tpm: session: NV %#x, EK from %s: %w", ekIndex, ek.Template, ErrEKMismatch)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return fmt.Errorf("tpm: session: %w: device closed", ErrUnreachable)
	}
	if up, err := d.sessionUp(want); up || err != nil { // another goroutine started it meanwhile
		return err
	}
	s, _, err := tpm2.HMACSession(d.l.with(ctx), tpm2.TPMAlgSHA256, sessionNonce,
		tpm2.Salted(tpm2.TPMHandle(ek.Handle), ek.pub))
	if err != nil {
		return mapErr("start salted session ("+ek.Template+")", err)
	}
	d.sess = &session{s: &checked{Session: s}, salt: ek.PublicKey, ekSource: ek.Template, ekIndex: ekIndex}
	return nil
}

// sessionUp reports whether a session runs that suits want (salted to it, or want nil); one salted to another key is
// an error. Callers hold d.mu.
func (d *Device) sessionUp(want crypto.PublicKey) (bool, error) {
	switch {
	case d.sess == nil:
		return false, nil
	case want == nil || keyEqual(d.sess.salt, want):
		return true, nil
	}
	return false, fmt.Errorf("tpm: session: already salted to another endorsement key (%s)", d.sess.ekSource)
}

// InSession reports whether StartSession ran on this Device.
func (d *Device) InSession() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.sess != nil
}

// SessionEK says which endorsement key the session is salted to ("persistent 0x81010016", "template L-2 (ECC
// P-256)") and its certificate's NV index (0: the default EK, trusted on first use); "" without a session.
func (d *Device) SessionEK() (source string, index uint32) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.sess == nil {
		return "", 0
	}
	return d.sess.ekSource, d.sess.ekIndex
}

// auth authorizes an object or hierarchy whose authValue is empty: through the session once started, else with the
// empty password. Callers hold d.mu.
func (d *Device) auth() tpm2.Session {
	if d.sess != nil {
		return d.sess.s
	}
	return tpm2.PasswordAuth(nil)
}

// activationAuth authorizes the attestation key of TPM2_ActivateCredential: with a session running, a one-off session
// salted to ek with response encryption (the recovered credential is the command's first response parameter, a
// TPM2B, so the TPM encrypts it); else the empty password. Callers hold d.mu.
func (d *Device) activationAuth(ek *EK) tpm2.Session {
	if d.sess == nil {
		return tpm2.PasswordAuth(nil)
	}
	return &checked{Session: tpm2.HMAC(tpm2.TPMAlgSHA256, sessionNonce,
		tpm2.Salted(tpm2.TPMHandle(ek.Handle), ek.pub), tpm2.AESEncryption(128, tpm2.EncryptOut))}
}

// sessionErr maps the error of a command authorized through auth (what d.auth or activationAuth returned): a
// response that failed its HMAC check or came back without a session area that parses, or the TPM refusing our HMAC
// (TPM_RC_AUTH_FAIL / TPM_RC_BAD_AUTH: every authValue here is empty, so only an altered command, a TPM that does
// not hold the EK, or an owner hierarchy with a password gets there), is ErrTampered and breaks the link; anything else
// is mapErr's. Callers hold d.mu.
func (d *Device) sessionErr(op string, auth tpm2.Session, err error) error {
	if err == nil {
		return nil
	}
	c, ok := auth.(*checked)
	if !ok {
		return mapErr(op, err)
	}
	pending := c.pending
	c.pending = false
	var rc tpm2.TPMRC
	switch {
	case errors.Is(err, ErrTampered):
	case errors.Is(err, ErrUnreachable), errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return mapErr(op, err)
	case errors.As(err, &rc):
		if !errors.Is(rc, tpm2.TPMRCAuthFail) && !errors.Is(rc, tpm2.TPMRCBadAuth) {
			return mapErr(op, err)
		}
		err = fmt.Errorf("%w: the TPM refused the command's session HMAC (%v): the command was altered on the way, "+
			"the TPM does not hold the endorsement key the session is salted to, or its owner hierarchy has a password",
			ErrTampered, rc)
	case pending:
		err = fmt.Errorf("%w: the response's session area: %v", ErrTampered, err)
	default:
		return mapErr(op, err)
	}
	d.tamper()
	return fmt.Errorf("tpm: %s: %w", op, err)
}

// tamper breaks the link after a response failed its check: the stream is not trusted, nothing more is sent on it
// (not even flushes: the TPM drops the session and objects with the connection, or the next WithFlushStale does).
// Callers hold d.mu.
func (d *Device) tamper() {
	if d.l.broken != nil {
		return
	}
	d.l.s.close()
	d.l.broken = fmt.Errorf("TPM at %s: a response failed its session check earlier, the link is not trusted; open the "+
		"TPM again: %w", d.uri, ErrUnreachable)
	d.sess = nil
}

// endSession flushes the session, if any (Close). Callers hold d.mu.
func (d *Device) endSession() {
	if d.sess == nil {
		return
	}
	h := d.sess.s.Handle()
	d.sess = nil
	if d.l.broken == nil && h != tpm2.TPMRHNull {
		tpm2.FlushContext{FlushHandle: h}.Execute(d.l.with(context.Background()))
	}
}

// flushSessions flushes the sessions a killed run left on a TPM without a resource manager (WithFlushStale). Callers
// hold d.mu.
func (d *Device) flushSessions(ctx context.Context) error {
	hs, err := d.sessionHandles(ctx)
	if err != nil {
		return err
	}
	for _, h := range hs {
		if _, err := (tpm2.FlushContext{FlushHandle: tpm2.TPMHandle(h)}).Execute(d.l.with(ctx)); err != nil {
			return mapErr(fmt.Sprintf("flush stale session %#x", h), err)
		}
	}
	return nil
}

// SessionHandles lists the sessions the TPM holds, loaded or saved (for leak checks).
func (d *Device) SessionHandles(ctx context.Context) ([]uint32, error) {
	if d.l == nil {
		return nil, nil
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.sessionHandles(ctx)
}

// sessionHandles lists the loaded sessions (TPM_HT_LOADED_SESSION, 0x02: HMAC 0x02… and policy 0x03… handles) and the
// saved ones (TPM_HT_SAVED_SESSION, 0x03: none unless a client saved a session's context, which nothing here does).
// Callers hold d.mu.
func (d *Device) sessionHandles(ctx context.Context) ([]uint32, error) {
	var out []uint32
	for _, ht := range []tpm2.TPMHT{tpm2.TPMHTHMACSession, tpm2.TPMHTPolicySession} {
		rsp, err := tpm2.GetCapability{Capability: tpm2.TPMCapHandles, Property: uint32(ht) << 24, PropertyCount: 64}.Execute(d.l.with(ctx))
		if err != nil {
			return nil, mapErr("list sessions", err)
		}
		hs, err := rsp.CapabilityData.Data.Handles()
		if err != nil {
			return nil, mapErr("list sessions", err)
		}
		for _, h := range hs.Handle {
			if t := tpm2.TPMHT(h >> 24); (t == tpm2.TPMHTHMACSession || t == tpm2.TPMHTPolicySession) && !slices.Contains(out, uint32(h)) {
				out = append(out, uint32(h))
			}
		}
	}
	return out, nil
}
